"""One progress reporter for the whole library (no ``print`` elsewhere).

The CLI installs a reporter that draws tqdm bars and one-line stage messages on stderr; the
library default is silent, so ``import qcompiler`` in a user's program prints nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Reporter:
    """Silent reporter: the interface every stage uses."""

    def stage(self, message: str) -> None:  # a one-line "what happens now"
        pass

    def warn(self, message: str) -> None:
        pass

    def iterate(self, items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
        yield from items

    @contextlib.contextmanager
    def timed(self, message: str):
        self.stage(message)
        yield


class ConsoleReporter(Reporter):
    """Stage lines and tqdm progress bars on stderr."""

    def __init__(self, stream=None, bars: bool = True):
        self._stream = stream
        self.bars = bars
        self.t0 = time.perf_counter()

    @property
    def stream(self):
        """The given stream, else ``sys.stderr`` as it is now (the CLI points it elsewhere while native
        code's stderr is held back: ``cli._native_stderr_held``)."""
        return self._stream or sys.stderr

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.perf_counter() - self.t0:6.1f}s] {text}\n")
        self.stream.flush()

    def stage(self, message: str) -> None:
        self._line(message)

    def warn(self, message: str) -> None:
        self._line("warning: " + message)

    def iterate(self, items, total, desc):
        if not self.bars:
            yield from items
            return
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    @contextlib.contextmanager
    def timed(self, message: str):
        t = time.perf_counter()
        self._line(message + " ...")
        yield
        self._line(f"{message}: done in {time.perf_counter() - t:.1f}s")


_current: Reporter = Reporter()


def get() -> Reporter:
    return _current


def set_reporter(reporter: Reporter) -> Reporter:
    global _current
    old, _current = _current, reporter
    return old
