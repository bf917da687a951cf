"""``metrics.jsonl``: the training log, one JSON object per logged step or evaluation."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping

import jax


def write_atomic(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` in one step (a reader sees the old or the new file)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "x") as f:  # not mkstemp, whose 0600 would outlive the rename
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a killed process
        return None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, written by process 0 only.

    Opening it for a run resumed at ``step`` drops the records of later steps, which the
    interrupted run logged after its last checkpoint and the resumed run will log again (and
    any line a killed process left unfinished).
    """

    def __init__(self, path: str, step: int):
        self.path = path
        self._enabled = jax.process_index() == 0
        if self._enabled and os.path.exists(path):
            with open(path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f if (s := _step(line)) is not None and s <= step]
            write_atomic(path, "".join(kept))

    def write(self, record: Mapping[str, float]) -> None:
        """Appends ``record``; NumPy and JAX scalars are written as plain numbers."""
        if self._enabled:
            line = json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in record.items()})
            with open(self.path, "a") as f:
                f.write(line + "\n")
