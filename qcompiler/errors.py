"""Typed errors raised where a problem is found; the CLI turns each into one line and exit code 2.

Every message names the file, node or op at fault and says what to do about it.  Anything else
that goes wrong inside a compile stage is a bug: ``stage(name)`` turns it into one ``InternalError``
line ("internal error in PASS at node N (op): ExcType: message; please report"), the node coming
from the innermost ``at_node`` block or, failing that, from the traceback's frames.
"""

from __future__ import annotations

import contextlib as _contextlib
import contextvars as _contextvars


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


class ResourceError(QCError):
    """The model (at the frozen shapes) needs more memory or larger sizes than this machine allows."""


class InternalError(QCError):
    """An unexpected failure inside the compiler (a bug): one line naming the pass, node and op."""

    def __init__(self, stage: str, exc: BaseException, node: tuple[str, str] | None = None):
        self.stage, self.node, self.cause = stage, node, exc
        where = f"at node {node[0]} ({node[1]})" if node else "at node ?"
        super().__init__(f"internal error in {stage} {where}: {type(exc).__name__}: {first_line(exc)}; please report")


# ---- which node is being worked on ------------------------------------------------------------
# Passes, the driver and the lowering may say which node they work on (``with at_node(n): ...``);
# an unexpected exception leaving such a block is tagged with the node, so the driver's
# ``stage(...)`` wrapper can name it in the InternalError.  Without a tag, the innermost frame of
# the traceback holding a graph node in a local variable names it.

_CURRENT_NODE: _contextvars.ContextVar = _contextvars.ContextVar("qc_current_node", default=None)
_NODE_ATTR = "_qc_node"
_MAX_LINE = 300


def node_label(node) -> tuple[str, str] | None:
    """(name, op) of a graph ``Node``, an ONNX ``NodeProto``, a (name, op) pair or a bare name."""
    if node is None:
        return None
    if isinstance(node, tuple) and len(node) == 2:
        return str(node[0]), str(node[1])
    if isinstance(node, str):
        return node, "?"
    op = getattr(node, "op", None) or getattr(node, "op_type", None)
    name = getattr(node, "name", None)
    if op is None and name is None:
        return None
    return (str(name) if name else "<unnamed>"), (str(op) if op else "?")


def current_node() -> tuple[str, str] | None:
    """The (name, op) of the innermost ``at_node`` block, or None."""
    return node_label(_CURRENT_NODE.get())


@_contextlib.contextmanager
def at_node(node):
    """Mark ``node`` as the one being worked on; an unexpected exception leaving the block is tagged
    with it (the innermost tag wins)."""
    token = _CURRENT_NODE.set(node)
    try:
        yield
    except Exception as e:
        if not isinstance(e, QCError) and getattr(e, _NODE_ATTR, None) is None:
            try:
                setattr(e, _NODE_ATTR, node_label(node))
            except Exception:  # exceptions without a __dict__
                pass
        raise
    finally:
        _CURRENT_NODE.reset(token)


def first_line(exc: BaseException) -> str:
    """The first informative line of an exception's message (no traceback frames), at most 300 chars."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for s in lines:
        if s.startswith(("Traceback", "File \"", "Stack trace", "Backtrace")):
            continue
        if (s.startswith("at ") and ("/" in s or ".cc" in s)) or (s[:1].isdigit() and ": 0x" in s):
            continue  # C++ backtrace frames
        break
    else:
        s = lines[-1] if lines else "(no message)"
        s = "(no message)" if s.startswith("Traceback") else s
    return s if len(s) <= _MAX_LINE else s[: _MAX_LINE - 3] + "..."


def _node_from_traceback(exc: BaseException) -> tuple[str, str] | None:
    """The innermost frame of ``exc``'s traceback holding a graph Node / ONNX NodeProto local."""
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for f in reversed(frames):
        try:
            local = f.f_locals
        except Exception:
            continue
        for key in ("node", "n", "nd", "cur"):
            v = local.get(key)
            if v is not None and _is_node(v):
                return node_label(v)
        for v in list(local.values()):
            if _is_node(v):
                return node_label(v)
    return None


def _is_node(v) -> bool:
    cls = type(v)
    return (cls.__name__ == "Node" and cls.__module__.endswith("graph")) or cls.__name__ == "NodeProto"


def internal(stage: str, exc: BaseException) -> QCError:
    """The QCError for an unexpected exception ``exc`` raised in ``stage``."""
    node = getattr(exc, _NODE_ATTR, None) or current_node() or _node_from_traceback(exc)
    if isinstance(exc, MemoryError):
        where = f" at node {node[0]} ({node[1]})" if node else ""
        return ResourceError(f"out of memory in {stage}{where}: the model at these shapes needs more memory than "
                             "this machine has; use a smaller batch or input size, or a larger machine")
    return InternalError(stage, exc, node)


@_contextlib.contextmanager
def stage(name: str):
    """Run a compile stage: QCErrors pass through, any other exception becomes one InternalError
    (MemoryError: ResourceError) naming the stage and, when known, the node.  KeyboardInterrupt and
    SystemExit pass through."""
    try:
        yield
    except QCError:
        raise
    except Exception as e:  # noqa: BLE001 - the point: nothing raw reaches the user
        raise internal(name, e) from e
