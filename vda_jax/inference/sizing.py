"""The network input size of the official pipeline (NumPy only: no JAX here)."""

from __future__ import annotations

import numpy as np

MULTIPLE = 14
MAX_ASPECT = 1.78  # wider frames get a smaller input size (memory)


def effective_input_size(frame_size: tuple[int, int], input_size: int) -> int:
    """The official rule: for aspect ratios above 1.78 the input size shrinks proportionally."""
    height, width = frame_size
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT:
        input_size = int(input_size * 1.777 / ratio)
        input_size = round(input_size / MULTIPLE) * MULTIPLE
    return input_size


def _multiple_at_least(x: float, minimum: int) -> int:
    y = int(np.round(x / MULTIPLE) * MULTIPLE)  # np.round: half to even, as the official code
    return int(np.ceil(x / MULTIPLE) * MULTIPLE) if y < minimum else y


def network_size(frame_size: tuple[int, int], input_size: int = 518, *,
                 limit_aspect: bool = True) -> tuple[int, int]:
    """Network input (height, width) for frames of ``frame_size``.

    Keeps the aspect ratio with the short side scaled to at least ``input_size``,
    both sides rounded to multiples of 14. ``limit_aspect`` applies the video
    pipeline's rule for frames wider than 1.78 (Depth Anything V2's image path has none).
    """
    height, width = frame_size
    if height < 1 or width < 1:
        raise ValueError(f"frame size {frame_size} is empty")
    if input_size < MULTIPLE:
        raise ValueError(f"input_size {input_size} must be at least {MULTIPLE}")
    size = effective_input_size(frame_size, input_size) if limit_aspect else input_size
    scale = max(size / height, size / width)
    return _multiple_at_least(scale * height, size), _multiple_at_least(scale * width, size)
