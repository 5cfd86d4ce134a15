"""qcompiler: a quantizing deep-learning compiler on Apache TVM (ONNX in, integer-only library out).

``qcompiler.load(path)`` loads a compiled ``model.so`` (+ ``model.json``) with the TVM runtime only.
The compiler itself lives in ``qcompiler.driver`` (imported lazily, so that loading a library never
pulls in the compiler).
"""

__version__ = "0.1.0"


def load(path, device: str | None = None):
    """Load a compiled library; returns a callable ``Library`` (see qcompiler.runtime)."""
    from .runtime import Library

    return Library(path, device=device)
