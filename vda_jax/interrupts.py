"""Ctrl-C held back over a block that must not be cut in two (a rename set, a thread's start)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Defers SIGINT until the block is done, then delivers it to the handler installed before.

    A no-op outside the main thread, the only one Python runs signal handlers in.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        signal.raise_signal(signal.SIGINT)
