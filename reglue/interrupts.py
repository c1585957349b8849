"""Ctrl-C while the heavy modules load (standard library only, so it is in place before torch is).

Python's default SIGINT handler raises ``KeyboardInterrupt`` at the next bytecode, wherever that is.
While ``import torch`` runs, that can be Python code called back from C++ (pybind11); the exception
then crosses C++ that cannot unwind it and the process aborts (``terminate called after throwing an
instance of 'pybind11::error_already_set'``, SIGABRT) instead of printing one line and exiting 130.
:func:`deferred_interrupt` holds a Ctrl-C for the length of such a block and raises it after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """A SIGINT received inside the block is raised as ``KeyboardInterrupt`` when the block ends
    (at once if the block raised anything else, that exception wins and the interrupt is dropped).
    Only Python's own handler is replaced: a SIGINT ignored at start, or handled by someone else's
    handler, or a call from another thread than the main one (which cannot set handlers), is left as is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def import_native_modules() -> None:
    """Import torch (with numpy) and, where installed, triton: the modules whose C++ extensions call
    back into Python while they load, with Ctrl-C deferred to the end."""
    with deferred_interrupt():
        import torch  # noqa: F401

        try:
            import triton  # noqa: F401
        except ImportError:
            pass
