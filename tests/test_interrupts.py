"""Stop signals (Ctrl-C, SIGTERM) held over blocks that must not be cut in two, and the decode thread's start."""

import signal
import threading

import numpy as np
import pytest

from vda_jax import interrupts
from vda_jax.inference import video


def test_held_defers_ctrl_c_to_the_previous_handler():
    received, done = [], []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with interrupts.held():
            signal.raise_signal(signal.SIGINT)
            assert received == []  # held
            done.append(True)
        assert done == [True] and received == [signal.SIGINT]  # the block ran to its end, then the handler ran
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT] * 2  # the handler is back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_held_defers_sigterm_too():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with interrupts.held():
            signal.raise_signal(signal.SIGTERM)
            assert received == []  # held
        assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_held_raises_keyboard_interrupt_after_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        signal.raise_signal(signal.SIGINT)
        done.append(True)
    assert done == [True]


def test_held_is_a_no_op_in_other_threads():
    errors = []

    def run():
        try:
            with interrupts.held():
                pass
        except Exception as e:  # signal.signal raises ValueError outside the main thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []


def test_ctrl_c_while_the_decode_thread_starts_stops_it(monkeypatch):
    """The interrupt leaves the reader only once its thread has closed the frames (nothing touches them after)."""
    closed = threading.Event()

    def frames():
        try:
            while True:
                yield np.zeros((2, 2, 3), np.uint8)
        finally:
            closed.set()

    start = threading.Thread.start

    def start_then_ctrl_c(thread):
        start(thread)
        signal.raise_signal(signal.SIGINT)  # arrives while start() waits for the new thread

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        next(video._prefetch(frames(), "clip"))
    assert closed.is_set()
