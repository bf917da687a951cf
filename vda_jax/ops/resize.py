"""The exact resizes of the official pipeline, on the device.

The separable taps (and their NumPy application, for the JAX-free runtime) live in
``vda_jax.ops.taps``; here they are applied with ``jax.numpy`` gathers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vda_jax.ops import taps
from vda_jax.ops.taps import Taps, bilinear_align_corners_taps, opencv_cubic_taps, torch_bicubic_taps

__all__ = ["Taps", "apply_taps", "bilinear_align_corners_taps", "opencv_cubic_taps", "resize_bilinear_align_corners",
           "resize_opencv_cubic", "resize_torch_bicubic_by_scale", "torch_bicubic_taps"]

apply_taps = functools.partial(taps.apply_taps, xp=jnp)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """Bilinear resize with ``align_corners=True`` of ``x`` (default layout ``[..., H, W, C]``)."""
    return taps.resize_2d(x, size, axes, bilinear_align_corners_taps, xp=jnp)


def resize_opencv_cubic(x: jax.Array, size: tuple[int, int],
                        axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """OpenCV INTER_CUBIC resize of ``x`` (default layout ``[..., H, W, C]``)."""
    return taps.resize_2d(x, size, axes, opencv_cubic_taps, xp=jnp)


def resize_torch_bicubic_by_scale(x: jax.Array, scale: tuple[float, float],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """PyTorch bicubic resize by scale factor: output size ``floor(in * scale)`` per axis."""
    for axis, s in zip(axes, scale):
        in_size = x.shape[axis]
        x = apply_taps(x, torch_bicubic_taps(in_size, int(np.floor(in_size * s)), float(s)), axis)
    return x
