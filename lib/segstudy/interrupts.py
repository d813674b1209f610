"""Ctrl-C that is not lost. Python raises KeyboardInterrupt wherever the main thread is, and one
raised inside a finalizer (SQLAlchemy's connection pool, a file being closed) is printed as
"Exception ignored" and dropped, so a long command would run on as if nothing was pressed. While
`remembered()` is active the signal is also remembered, and the training and evaluation loops
`check()` after every batch."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = False
_deferring = False


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    if not _deferring:
        raise KeyboardInterrupt


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Remember Ctrl-C for the duration (the command line's main; the main thread only, where signal
    handlers live), then restore the handler that was there."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Ctrl-C during the block is raised when the block ends, for a database write that an exception
    in its middle leaves holding the file's lock (Optuna's SQLite storage: the same process could then
    not mark its trial failed). Only under `remembered()`; elsewhere Ctrl-C raises where it lands."""
    global _deferring
    outer, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = outer
    if not outer:
        check()


def check() -> None:
    """Raise KeyboardInterrupt for a Ctrl-C that came and was dropped on the way."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
