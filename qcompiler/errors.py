"""Typed errors raised where a problem is found; the CLI turns each into one line and exit code 2.

Every message names the file, node or op at fault and says what to do about it.
"""

from __future__ import annotations


class QCError(Exception):
    """Base class: a user-facing problem (bad input, unsupported model, impossible request)."""

    exit_code = 2


class ModelError(QCError):
    """The ONNX file cannot be read, checked, upgraded or imported."""


class UnsupportedOpError(QCError):
    """The model uses ops (or op attributes) the integer pipeline does not implement."""

    def __init__(self, items: list[tuple[str, str, str]]):
        # items: (op_type, node_name, why)
        self.items = items
        by_op: dict[str, list[str]] = {}
        for op, node, why in items:
            by_op.setdefault(op + (f" ({why})" if why else ""), []).append(node or "<unnamed>")
        parts = [f"{op}: {', '.join(nodes[:6])}{' ...' if len(nodes) > 6 else ''}" for op, nodes in by_op.items()]
        super().__init__(
            "unsupported ops for the integer pipeline: " + "; ".join(parts)
            + " (remove or replace them in the ONNX model, or file an issue)"
        )


class CalibrationError(QCError):
    """Calibration data missing, mis-shaped, mis-typed or non-finite."""


class QuantizationError(QCError):
    """A quantization rule cannot hold (overflow bound, scale mismatch)."""


class TargetError(QCError):
    """Unknown target/arch or a request the target cannot serve."""


class InputError(QCError):
    """Run-time inputs that do not match the compiled library."""


class ArtifactError(QCError):
    """A compiled library or its metadata is missing, foreign or corrupt."""
