"""The exact resizes of the official pipeline, as separable gathers.

Every resize here is separable: along one axis, output index ``i`` reads ``K``
source indices with ``K`` weights (4 taps for cubic, 2 for bilinear). The taps
are computed once on the host in NumPy (they depend only on static sizes) and
applied on the device with a gather and a weighted sum, which costs
``O(K * pixels)`` instead of the ``O(in * pixels)`` of a dense resize matrix.

Three conventions are covered, each matching a library bit for bit in layout:
  * ``torch_bicubic_taps``: PyTorch ``interpolate(mode="bicubic",
    align_corners=False)`` given an explicit scale factor (DINOv2's
    position-embedding resize), a = -0.75, border taps clamped;
  * ``opencv_cubic_taps``: OpenCV ``resize(INTER_CUBIC)``, a = -0.75,
    half-pixel centres, no antialiasing, border taps clamped;
  * ``bilinear_align_corners_taps``: PyTorch bilinear with ``align_corners=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Taps = tuple[np.ndarray, np.ndarray]  # (indices [out, K] int32, weights [out, K] float32)

_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray, a: float = _CUBIC_A) -> np.ndarray:
    """Keys cubic convolution weights for fractional offsets ``t`` in [0, 1): [..., 4]."""
    t = t[..., None]
    x = np.abs(np.concatenate([t + 1, t, 1 - t, 2 - t], axis=-1))
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, far)


def _cubic_taps(src: np.ndarray, in_size: int) -> Taps:
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(idx, 0, in_size - 1).astype(np.int32), weights.astype(np.float32)


@functools.lru_cache(maxsize=256)
def torch_bicubic_taps(in_size: int, out_size: int, scale: float) -> Taps:
    """PyTorch bicubic (align_corners=False) with an explicit ``scale_factor``.

    PyTorch maps output pixel ``i`` to source ``(i + 0.5) / scale - 0.5`` when the
    caller passes a scale factor, which differs from ``in/out`` whenever
    ``out = floor(in * scale)`` rounds.
    """
    # PyTorch evaluates this in float32 as one fused multiply-add: round once.
    inv_scale = np.float64(np.float32(1.0 / scale))
    src = (inv_scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    return _cubic_taps(src, in_size)


@functools.lru_cache(maxsize=256)
def opencv_cubic_taps(in_size: int, out_size: int) -> Taps:
    """OpenCV INTER_CUBIC taps, including its float32 rounding of the source coordinate."""
    scale = 1.0 / (out_size / in_size)
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    return _cubic_taps(src, in_size)


@functools.lru_cache(maxsize=256)
def bilinear_align_corners_taps(in_size: int, out_size: int) -> Taps:
    """PyTorch bilinear taps with ``align_corners=True``: corners map onto corners."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = np.arange(out_size, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    frac = src - lo
    idx = np.stack([lo, np.minimum(lo + 1, in_size - 1)], axis=-1)
    weights = np.stack([1.0 - frac, frac], axis=-1)
    return idx.astype(np.int32), weights.astype(np.float32)


def apply_taps(x: jax.Array, taps: Taps, axis: int) -> jax.Array:
    """Resizes ``x`` along ``axis`` with precomputed ``taps``; other axes untouched."""
    idx, weights = taps
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = len(idx)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = jnp.zeros((), dtype)
    # One whole-slice gather per tap: XLA's CPU gather is far faster on a 1-D index list
    # than on an [out, K] index array.
    for k in range(idx.shape[1]):
        tap = jnp.take(x, jnp.asarray(idx[:, k]), axis=axis).astype(dtype)
        out = out + tap * jnp.asarray(weights[:, k]).reshape(shape)
    return out.astype(x.dtype)


def _resize_2d(x: jax.Array, size: tuple[int, int], axes: tuple[int, int], make_taps) -> jax.Array:
    (h_axis, w_axis), (out_h, out_w) = axes, size
    if x.shape[h_axis] != out_h:
        x = apply_taps(x, make_taps(x.shape[h_axis], out_h), h_axis)
    if x.shape[w_axis] != out_w:
        x = apply_taps(x, make_taps(x.shape[w_axis], out_w), w_axis)
    return x


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """Bilinear resize with ``align_corners=True`` of ``x`` (default layout ``[..., H, W, C]``)."""
    return _resize_2d(x, size, axes, bilinear_align_corners_taps)


def resize_opencv_cubic(x: jax.Array, size: tuple[int, int],
                        axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """OpenCV INTER_CUBIC resize of ``x`` (default layout ``[..., H, W, C]``)."""
    return _resize_2d(x, size, axes, opencv_cubic_taps)


def resize_torch_bicubic_by_scale(x: jax.Array, scale: tuple[float, float],
                                  axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """PyTorch bicubic resize by scale factor: output size ``floor(in * scale)`` per axis."""
    for axis, s in zip(axes, scale):
        in_size = x.shape[axis]
        x = apply_taps(x, torch_bicubic_taps(in_size, int(np.floor(in_size * s)), float(s)), axis)
    return x
