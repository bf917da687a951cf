"""Log messages of the libraries underneath that tell a vda-jax user nothing, dropped at their logger.

Each module that triggers such a message names it where it uses the library, with the reason.
"""

from __future__ import annotations

import logging


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop(logger: str, *fragments: str) -> None:
    """Drops the records of ``logger`` whose message contains one of ``fragments`` (once per call site's set)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, _Drop) and f.fragments == fragments for f in log.filters):
        log.addFilter(_Drop(fragments))
