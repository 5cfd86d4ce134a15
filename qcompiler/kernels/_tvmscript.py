"""``TS.prim_func``: TVMScript's ``T.prim_func`` without the cost of reading every frame's source line.

``T.prim_func`` captures its caller's frames with ``inspect.stack()`` (to resolve the closure
variables the function body names), and ``inspect.stack()`` reads the source line of every frame on
the stack.  A compile defines its tensor intrinsics and CUDA kernels deep inside the build (~60
frames): the x86 intrinsics' 24 definitions took 1.8 s of every CPU compile (0.06 s each, measured
2026-12-07 on the Zen 4 VM).  The frames themselves are all the parser needs: the source line is
read only to tell a method of an ``@I.ir_module`` class, which these functions never are.  So this
runs ``T.prim_func(...)`` with ``inspect.stack`` giving frames without context lines
(``inspect.stack(0)``), for that call only.  Written ``@TS.prim_func(s_tir=True)``: the parser reads
the decorator's source and wants an attribute named ``prim_func``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

from tvm.script import tirx as T

_LOCK = threading.RLock()  # a parse may import a module that defines its own


class _FramesOnly:
    """The ``inspect`` module as the TVMScript parser sees it, with ``stack`` not reading sources."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1):  # noqa: ARG004 - the parser asks for the default context
        return inspect.stack(0)


@contextlib.contextmanager
def _frames_only():
    from tvm.tirx.script.parser import entry

    with _LOCK:
        old = entry.inspect
        entry.inspect = _FramesOnly()
        try:
            yield
        finally:
            entry.inspect = old


def prim_func(**kwargs):
    """``T.prim_func(**kwargs)`` (a decorator), its caller's frames captured without source lines."""
    with _frames_only():
        deco = T.prim_func(**kwargs)

    def apply(func):
        with _frames_only():
            return deco(func)
    apply.dispatch_token = "tirx"  # the parser reads the decorator's token to pick the tirx dialect
    return apply


class TS:
    """The namespace the decorator is written in (``@TS.prim_func(...)``)."""

    prim_func = staticmethod(prim_func)
