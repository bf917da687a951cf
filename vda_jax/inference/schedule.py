"""The official long-video schedule: 32-frame windows every 22 frames, key frames, blend weights.

NumPy only (no JAX), so the JAX-free runtime follows the same schedule.
"""

from __future__ import annotations

import numpy as np

WINDOW_FRAMES = 32
OVERLAP_FRAMES = 10
STRIDE = WINDOW_FRAMES - OVERLAP_FRAMES  # 22 new frames per window
KEYFRAMES = (0, 12, 24, 25, 26, 27, 28, 29, 30, 31)
INTERP_FRAMES = 8
ALIGN_FRAMES = OVERLAP_FRAMES - INTERP_FRAMES  # the 2 key frames the fit uses
FINAL_END = WINDOW_FRAMES - INTERP_FRAMES  # 24: frames [ALIGN_FRAMES, FINAL_END) are final after a step


def blend_weights(frames: int = INTERP_FRAMES) -> np.ndarray:
    """Weights of the newer window in the overlap blend: ``i / (frames - 1)``, float32 ``[frames]``."""
    return (np.arange(frames) * (1.0 / (frames - 1))).astype(np.float32)


def num_windows(num_frames: int) -> int:
    """Windows the official pipeline runs for a video of ``num_frames``: one per started 22 frames."""
    return -(-num_frames // STRIDE)

