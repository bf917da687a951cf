"""What the processes of a run agree on: when to stop, and that a failure on one ends them all.

Stopping: SIGTERM (how clusters preempt) and SIGINT (Ctrl-C) on any process stop every
process at the same step boundary. In a multi-process run JAX's preemption notifier catches
SIGTERM and its sync manager picks the step (``multihost_utils.reached_preemption_sync_point``);
a Ctrl-C is turned into a SIGTERM of its own process so it takes the same path. A single
process uses a local flag.

Failing: a process that raises publishes the cause in JAX's distributed key-value store and
exits; a watcher thread in every other process sees it within a second and exits too (code 1),
instead of waiting in a collective for a peer that is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator

import jax
from jax._src import distributed  # the coordination client has no public handle
from jax.experimental import multihost_utils

_FAILURE_KEY = "vda_jax/failure"
_POLL_MS = 1000
# Process 0 hosts the coordination service: it leaves last, so that the others read the failure
# and exit with their own message rather than on a lost connection.
_COORDINATOR_GRACE_S = 2.0


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0:
        time.sleep(_COORDINATOR_GRACE_S)
    os._exit(code)  # skips JAX's shutdown barrier, which the other processes never reach


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing; every process raises it at the same step."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


class StopSignals:
    """Turns SIGINT / SIGTERM into a stop that every process takes at the same step.

    Use as a context manager around the training loop and call ``should_stop(step)`` once per
    step, with the same steps on every process. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.signum: int | None = None  # the signal this process received, if any
        self._previous: dict[int, object] = {}
        self._multi_process = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are only delivered to the main thread
        # In a multi-process run SIGTERM belongs to JAX's preemption notifier.
        for signum in (signal.SIGINT,) if self._multi_process else (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:  # the second Ctrl-C
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT, signal.default_int_handler))
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells every process

    def should_stop(self, step: int) -> bool:
        """Whether every process stops before training step ``step + 1`` (a collective decision)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    @property
    def stop_signal(self) -> int:
        """The signal to report: this process's own, else SIGTERM (another process was told)."""
        return self.signum or signal.SIGTERM


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """In a multi-process run, an exception in any process ends every process with exit code 1.

    ``Interrupted`` passes through (every process raises it together). Single-process runs
    are left alone: the exception propagates as usual.
    """
    client = distributed.global_state.client
    if jax.process_count() == 1 or client is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                cause = client.blocking_key_value_get(_FAILURE_KEY, _POLL_MS)
            except Exception:  # noqa: BLE001 - not set yet (a deadline error)
                continue
            if not done.is_set():
                print(f"vda-jax: process {jax.process_index()} stops: {cause}", file=sys.stderr, flush=True)
                _exit(1)

    watcher = threading.Thread(target=watch, name="vda-jax-failure-watch", daemon=True)
    watcher.start()
    try:
        yield
    except Interrupted:
        raise
    except BaseException as e:  # noqa: B036 - any failure, Ctrl-C included, must end the others
        done.set()
        cause = f"process {jax.process_index()} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not isinstance(e, (ValueError, OSError)):  # bad input gets its one line only
            traceback.print_exc()
        print(f"vda-jax: {cause}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # another process may have published first
            client.key_value_set(_FAILURE_KEY, cause)
        _exit(1)
    finally:
        done.set()
        watcher.join()  # a thread left blocked in the client aborts the interpreter at exit
