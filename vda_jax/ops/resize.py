"""The exact resizes of the official pipeline, on the device.

The separable taps (and their NumPy application, for the JAX-free runtime) live in
``vda_jax.ops.taps``; here they are applied with ``jax.numpy``: gathers of whole slices
along an outer axis, and a small matmul with the dense ``[in, out]`` matrix along the
minor axis (of a depth map ``[..., H, W]``), where a gather would read one element per
index: XLA:CPU runs that one tens of times slower than the matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vda_jax.ops import taps
from vda_jax.ops.taps import Taps, bilinear_align_corners_taps, opencv_cubic_taps, torch_bicubic_taps

__all__ = ["Taps", "apply_taps", "bilinear_align_corners_taps", "opencv_cubic_taps", "resize_bilinear_align_corners",
           "resize_opencv_cubic", "resize_torch_bicubic_by_scale", "torch_bicubic_taps"]


def apply_taps(x: jax.Array, taps_: Taps, axis: int, dtype: jnp.dtype | None = None) -> jax.Array:
    """Resizes ``x`` along ``axis`` with precomputed taps; other axes untouched.

    The taps are applied in float32 (or wider) whatever ``x``'s dtype; ``dtype`` is the
    result's (default ``x``'s).

    Along the minor axis the taps act as a dense matrix in one float32 matmul: each output
    sums the same ``K`` products (the other terms are exact zeros), up to the rounding of
    a fused multiply-add.
    """
    if axis % x.ndim != x.ndim - 1:
        return taps.apply_taps(x, taps_, axis, jnp, dtype)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    matrix = jnp.asarray(taps.dense_matrix(taps_, x.shape[-1]), compute)
    out = jnp.matmul(x.astype(compute), matrix, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype if dtype is None else dtype)


def _resize_2d(x: jax.Array, size: tuple[int, int], axes: tuple[int, int], make_taps,
               dtype: jnp.dtype | None = None) -> jax.Array:
    """Resizes two axes of ``x`` to ``size`` with ``make_taps(in, out)``, the minor axis (if resized)
    where the other axis is at its smaller size (its matmul then covers the fewest rows); the
    result has ``dtype`` (default ``x``'s)."""
    (h_axis, w_axis), (out_h, out_w) = axes, size
    dtype = x.dtype if dtype is None else dtype
    order = [(h_axis, out_h), (w_axis, out_w)]
    if w_axis % x.ndim == x.ndim - 1 and out_h > x.shape[h_axis]:
        order.reverse()
    for axis, out in order:
        if x.shape[axis] != out:
            x = apply_taps(x, make_taps(x.shape[axis], out), axis, dtype)
    return x.astype(dtype)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """Bilinear resize with ``align_corners=True`` of ``x`` (default layout ``[..., H, W, C]``)."""
    return _resize_2d(x, size, axes, bilinear_align_corners_taps)


def resize_opencv_cubic(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (-3, -2),
                        dtype: jnp.dtype | None = None) -> jax.Array:
    """OpenCV INTER_CUBIC resize of ``x`` (default layout ``[..., H, W, C]``) to a ``dtype`` result
    (default ``x``'s; the taps are applied in float32 whatever ``x``'s dtype)."""
    return _resize_2d(x, size, axes, opencv_cubic_taps, dtype)


def resize_torch_bicubic_by_scale(x: jax.Array, scale: tuple[float, float],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """PyTorch bicubic resize by scale factor: output size ``floor(in * scale)`` per axis."""
    for axis, s in zip(axes, scale):
        in_size = x.shape[axis]
        x = apply_taps(x, torch_bicubic_taps(in_size, int(np.floor(in_size * s)), float(s)), axis)
    return x
