"""The exact resizes of the official pipeline, as separable gathers (NumPy only: no JAX here).

Every resize here is separable: along one axis, output index ``i`` reads ``K``
source indices with ``K`` weights (4 taps for cubic, 2 for bilinear). The taps
are computed once on the host in NumPy (they depend only on static sizes) and
applied with a gather and a weighted sum (``jax.numpy`` on the device, see
``vda_jax.ops.resize``; ``numpy`` in the JAX-free runtime), which costs
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
from collections.abc import Callable
from typing import Any

import numpy as np

Array = Any  # numpy or jax array
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


def apply_taps(x: Array, taps: Taps, axis: int, xp: Any = np, dtype: Any = None) -> Array:
    """Resizes ``x`` along ``axis`` with precomputed ``taps``; other axes untouched.

    ``xp`` is the array module: ``numpy`` on the host, ``jax.numpy`` on the device. The taps
    are applied in float32 (or wider) whatever ``x``'s dtype; ``dtype`` is the result's
    (default ``x``'s).
    """
    idx, weights = taps
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = len(idx)
    compute = xp.promote_types(x.dtype, xp.float32)
    out = xp.zeros((), compute)
    # One whole-slice gather per tap: XLA's CPU gather is far faster on a 1-D index list
    # than on an [out, K] index array.
    for k in range(idx.shape[1]):
        tap = xp.take(x, xp.asarray(idx[:, k]), axis=axis).astype(compute)
        out = out + tap * xp.asarray(weights[:, k]).reshape(shape)
    return out.astype(x.dtype if dtype is None else dtype, copy=False)


def dense_matrix(taps: Taps, in_size: int) -> np.ndarray:
    """The taps as the ``[in_size, out]`` matrix of the resize (``y = x @ matrix`` along the axis)."""
    idx, weights = taps
    matrix = np.zeros((in_size, len(idx)), np.float32)
    for k in range(idx.shape[1]):  # clamped border taps may repeat an index: their weights add
        np.add.at(matrix, (idx[:, k], np.arange(len(idx))), weights[:, k])
    return matrix


def resize_2d(x: Array, size: tuple[int, int], axes: tuple[int, int], make_taps: Callable[[int, int], Taps],
              xp: Any = np, dtype: Any = None) -> Array:
    """Resizes two axes of ``x`` to ``size`` with the taps ``make_taps(in, out)`` gives; the
    result has ``dtype`` (default ``x``'s, see ``apply_taps``)."""
    (h_axis, w_axis), (out_h, out_w) = axes, size
    dtype = x.dtype if dtype is None else dtype
    if x.shape[h_axis] != out_h:
        x = apply_taps(x, make_taps(x.shape[h_axis], out_h), h_axis, xp, dtype)
    if x.shape[w_axis] != out_w:
        x = apply_taps(x, make_taps(x.shape[w_axis], out_w), w_axis, xp, dtype)
    return x.astype(dtype, copy=False)  # NumPy copies by default: not for a result already in dtype


