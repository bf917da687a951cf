"""Host-side pre- and post-processing of the official pipeline, in NumPy."""

from __future__ import annotations

import numpy as np

from vda_jax.config import IMAGENET_MEAN, IMAGENET_STD
from vda_jax.ops.taps import bilinear_align_corners_taps, opencv_cubic_taps, resize_2d

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def preprocess(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB ``[..., H, W, 3]`` -> ImageNet-normalised float32 ``[..., h, w, 3]`` (OpenCV cubic resize)."""
    x = resize_2d(frames, size, (-3, -2), opencv_cubic_taps, dtype=np.float32) / np.float32(255.0)
    return (x - _MEAN) / _STD


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Depth ``[..., h, w]`` -> ``[..., H, W]``, bilinear with aligned corners, as the official pipeline."""
    return resize_2d(depth.astype(np.float32), size, (-2, -1), bilinear_align_corners_taps)
