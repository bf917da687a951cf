"""Closed-form least-squares scale and shift between two depth maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum of all elements by halving, with O(log n) rounding error in float32.

    XLA's CPU reductions of multi-axis arrays can lose ~1e-5 relative on smooth
    depth maps, enough to move the fitted shift visibly.
    """
    x = x.ravel()
    x = jnp.pad(x, (0, (1 << max(x.size - 1, 0).bit_length()) - x.size))
    while x.size > 1:
        half = x.size // 2
        x = x[:half] + x[half:]
    return x[0]


def scale_and_shift(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``(s, b)`` minimising ``sum(mask * (s * pred + b - target) ** 2)``.

    Sums run over every axis of the inputs; ``jax.vmap`` gives one pair per
    leading index. The 2x2 normal equations are solved in centred form (the same
    solution with less cancellation in float32). Where their determinant is 0
    (empty mask, or ``pred`` constant on it) the identity ``(1, 0)`` is returned,
    as in the official inference.

    Args:
      pred: float array of any shape, e.g. ``[T, H, W]``.
      target: same shape as ``pred``.
      mask: same shape; bool, or non-negative float weights.

    Returns:
      ``(scale, shift)``, float32 scalars.
    """
    if not pred.shape == target.shape == mask.shape:
        raise ValueError(f"pred, target and mask must share one shape, got {pred.shape}, {target.shape}, {mask.shape}.")
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    w = jnp.asarray(mask, jnp.float32)
    n = _pairwise_sum(w)
    n_safe = jnp.where(n > 0, n, 1.0)
    pred_mean = _pairwise_sum(w * pred) / n_safe
    target_mean = _pairwise_sum(w * target) / n_safe
    centred = pred - pred_mean
    var = _pairwise_sum(w * centred * centred)
    cov = _pairwise_sum(w * centred * (target - target_mean))
    solvable = var > 0  # the determinant of the normal equations is n * var
    scale = jnp.where(solvable, cov / jnp.where(solvable, var, 1.0), 1.0)
    shift = jnp.where(solvable, target_mean - scale * pred_mean, 0.0)
    return scale, shift
