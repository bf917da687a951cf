"""Stop signals (Ctrl-C's SIGINT, and SIGTERM) held back over a block that must not be cut in two
(a rename set, a thread's start)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# What stops a command: Ctrl-C, and SIGTERM, which `timeout`, SLURM and Kubernetes send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Defers the stop signals until the block is done, then delivers them to the handlers installed before.

    A no-op outside the main thread, the only one Python runs signal handlers in.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, before in previous.items():  # None: installed outside Python; restore Python's default
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, before if before is not None else default)
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)
