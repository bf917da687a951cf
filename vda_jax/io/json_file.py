"""Reading the JSON files vda-jax writes beside models, exports and training runs."""

from __future__ import annotations

import json
from typing import Any


def read_json(path: str, advice: str, error: type[Exception] = ValueError) -> Any:
    """The value in the JSON file ``path``.

    Raises:
      error: the file is not JSON (or not text); the message names ``path`` and ends with ``advice``.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not JSON ({e}); {advice}") from None
