"""The last resort of a clean interruption: a watchdog that ends a command a signal did not end.

SIGINT / SIGTERM normally raise in the main thread (``qcompiler/cli.py``) and the command unwinds,
removing what it created.  That needs the main thread to run Python code again; a few places can
keep it from doing so for long or for good -- a native call that does not return soon, a signal
landing inside an import that leaves a module lock held (then the next import waits forever).  So
the console command also arms a watchdog: Python's C-level signal handler writes each signal's
number to a pipe (``signal.set_wakeup_fd``) at once, whatever the main thread is doing; a thread
blocked on that pipe wakes, gives the normal path ``GRACE_S`` seconds, and if the process is still
there removes the temporary files and folders registered here (``register`` / ``unregister``: the
atomic outputs of ``qcompiler/artifact.py``, the tuning scratch folder of ``qcompiler/tune/measure.py``),
stops the child processes, prints the command's one line and leaves with 130 / 143.

The watchdog is a Python thread and needs the interpreter lock; a native call that holds it forever
would silence it too.  For that case ``arm`` also registers ``faulthandler`` on SIGUSR1: ``kill -USR1
<pid>`` prints every thread's Python stack to stderr from C, whatever holds the lock (what a hung
command is doing; ``tests/test_reliability_interrupt.py`` asks for it before it kills one).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

GRACE_S = 8.0
_paths: set[str] = set()
_lock = threading.Lock()
SIGNALLED: list[int] = []
"""The signals received while a command runs (``qcompiler/cli.py`` appends and clears it)."""


def reraise_if_signalled(e: BaseException) -> None:
    """Raise the interruption behind ``e`` if a signal was received: a KeyboardInterrupt raised inside
    a TVM call comes back as that call's RuntimeError, which a loop that skips a failing item (a
    tuning record whose config no longer builds) would otherwise swallow and go on."""
    if SIGNALLED:
        raise KeyboardInterrupt() from e


def register(path) -> None:
    """A temporary file or folder to remove if the watchdog has to end the process."""
    with _lock:
        _paths.add(str(path))


def unregister(path) -> None:
    with _lock:
        _paths.discard(str(path))


def _cleanup() -> None:
    with _lock:
        paths = list(_paths)
    for p in paths:
        try:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.unlink(p)
        except OSError:
            pass
    kill_children(2.0)


def kill_children(timeout: float = 3.0) -> None:
    """Kill this process's child processes (worker pools), waiting up to ``timeout`` s for them."""
    try:
        import psutil

        kids = psutil.Process().children(recursive=True)
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=timeout)
    except Exception:  # noqa: BLE001 - no psutil / nothing to kill: the workers end when their pipes close
        pass


def arm(command: str) -> bool:
    """Arm the watchdog for ``qc <command>`` (main thread of the console script only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (OSError, ValueError, AttributeError):
        return False

    def watch():
        while True:
            try:
                data = os.read(r, 16)
            except OSError:
                return
            sigs = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
            if not sigs:
                continue
            time.sleep(GRACE_S)  # the normal path ends the process well before this
            _cleanup()
            term = sigs[0] == signal.SIGTERM
            try:
                sys.stderr.write(f"qc {command}: {'terminated' if term else 'interrupted'} (stopped after "
                                 f"{GRACE_S:.0f} s; no partial output was written)\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os._exit(143 if term else 130)

    threading.Thread(target=watch, name="qc-interrupt-watchdog", daemon=True).start()
    try:
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    except (AttributeError, ValueError, RuntimeError, OSError):  # no SIGUSR1 (Windows): no stack dump
        pass
    return True
