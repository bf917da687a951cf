"""Training losses of Video Depth Anything, as in the official ``loss/loss.py``.

* Spatial: scale-and-shift-invariant trimmed MAE between the robustly
  normalised prediction and target, plus ``alpha`` times a multi-scale gradient
  matching term (``TrimmedProcrustesLoss``), over every frame of the batch.
* Temporal (stable): temporal gradient matching (TGM) of the prediction after
  one least-squares scale/shift per clip, ignoring pixels whose ground-truth
  change between frames exceeds a fraction of that frame's depth range.

Everything is static-shaped and jit-friendly: selections are masks, trimming
is a sort with invalid entries pushed to the end, and every reduction is
"batch-based" (sum over the whole batch / number of valid pixels). All losses
are computed in float32 and are 0 where nothing is valid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from vda_jax.ops.align import scale_and_shift


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den`` is 0 (with finite gradients)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0.0)


def _check_inputs(pred: jax.Array, target: jax.Array, mask: jax.Array, rank: int) -> tuple[jax.Array, ...]:
    chex.assert_rank(pred, rank)
    chex.assert_equal_shape((pred, target, mask))
    return pred.astype(jnp.float32), target.astype(jnp.float32), mask.astype(bool)


def _check_trim(trim: float) -> None:
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim is the fraction of largest residuals dropped and must be in [0, 1), got {trim}.")


def robust_normalize(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per image: ``(x - median) / mean|x - median|`` over the valid pixels.

    As the official code does, the median is the lower median of ``mask * x``
    over *all* pixels of the image (masked-out pixels count as zeros), and the
    mean absolute deviation is clamped below at 1e-6. Images without valid
    pixels are returned unchanged.

    Args:
      x: float ``[N, H, W]``.
      mask: bool ``[N, H, W]``.

    Returns:
      float ``[N, H, W]``.
    """
    w = mask.astype(x.dtype)
    count = jnp.sum(w, axis=(1, 2))
    flat = (w * x).reshape(x.shape[0], -1)
    median = jnp.sort(flat, axis=1)[:, (flat.shape[1] - 1) // 2]
    median = jnp.where(count > 0, median, 0.0)
    centred = x - median[:, None, None]
    mad = jnp.maximum(_safe_div(jnp.sum(w * jnp.abs(centred), axis=(1, 2)), count), 1e-6)
    return centred / jnp.where(count > 0, mad, 1.0)[:, None, None]


def trimmed_mae(pred: jax.Array, target: jax.Array, mask: jax.Array, *, trim: float = 0.0) -> jax.Array:
    """Mean absolute error over the batch after dropping the largest residuals.

    The ``floor(n * (1 - trim))`` smallest of the ``n`` valid residuals of the
    whole batch are summed and divided by ``n`` (not by the number kept), as in
    the official ``TrimmedMAELoss``.

    Args:
      pred, target: float arrays of one shape, e.g. ``[N, H, W]``.
      mask: bool, same shape.
      trim: fraction of the valid residuals to drop, in [0, 1).

    Returns:
      float32 scalar.
    """
    _check_trim(trim)
    residual = jnp.abs(pred - target)
    count = jnp.sum(mask)
    if trim == 0.0:
        kept = jnp.sum(jnp.where(mask, residual, 0.0))
    else:
        ranked = jnp.sort(jnp.where(mask, residual, jnp.inf).ravel())
        keep = jnp.floor(count.astype(jnp.float32) * (1.0 - trim))
        kept = jnp.sum(jnp.where(jnp.arange(ranked.size) < keep, ranked, 0.0))
    return _safe_div(kept, count.astype(jnp.float32))


def gradient_matching_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, *, scales: int = 4) -> jax.Array:
    """Multi-scale L1 gradient matching of ``pred - target`` (official ``GradientLoss``).

    At scale ``k`` the images are subsampled with stride ``2**k``; the
    horizontal and vertical differences of the masked residual count where
    both pixels are valid. Each scale is normalised by its number of valid
    pixels over the batch, and the scales are summed.

    Args:
      pred, target: float ``[N, H, W]``.
      mask: bool ``[N, H, W]``.
      scales: number of scales.

    Returns:
      float32 scalar.
    """
    total = jnp.zeros((), jnp.float32)
    for k in range(scales):
        step = 2**k
        w = mask[:, ::step, ::step].astype(jnp.float32)
        diff = w * (pred[:, ::step, ::step] - target[:, ::step, ::step])
        grad_x = jnp.abs(diff[:, :, 1:] - diff[:, :, :-1]) * w[:, :, 1:] * w[:, :, :-1]
        grad_y = jnp.abs(diff[:, 1:, :] - diff[:, :-1, :]) * w[:, 1:, :] * w[:, :-1, :]
        total += _safe_div(jnp.sum(grad_x) + jnp.sum(grad_y), jnp.sum(w))
    return total


def trimmed_procrustes_loss(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    *,
    alpha: float = 0.5,
    scales: int = 4,
    trim: float = 0.0,
) -> jax.Array:
    """Scale-and-shift-invariant loss on images (official ``TrimmedProcrustesLoss``).

    Both maps are robustly normalised per image, then compared with a trimmed
    MAE plus ``alpha`` times the multi-scale gradient matching loss.

    Args:
      pred, target: float ``[N, H, W]``.
      mask: bool ``[N, H, W]``.
      alpha: weight of the gradient term (0 disables it).
      scales: number of gradient scales.
      trim: fraction of the largest residuals dropped from the MAE.

    Returns:
      float32 scalar.
    """
    pred, target, mask = _check_inputs(pred, target, mask, rank=3)
    pred = robust_normalize(pred, mask)
    target = robust_normalize(target, mask)
    loss = trimmed_mae(pred, target, mask, trim=trim)
    if alpha > 0:
        loss += alpha * gradient_matching_loss(pred, target, mask, scales=scales)
    return loss


def temporal_gradient_matching_loss(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    *,
    trim: float = 0.0,
    scales: int = 1,
    decay: float = 0.5,
    max_change: float = 0.05,
) -> jax.Array:
    """Temporal gradient matching (official ``TemporalGradientMatchingLoss``).

    At temporal scale ``k`` (stride ``s = 2**k``, used while ``s < T``) the
    frame differences ``x[t + s] - x[t]`` of prediction and target are compared
    with a trimmed MAE weighted by ``decay**k``, on pixels valid in both frames
    whose target difference is below ``max_change`` times the later frame's
    depth range (max - min of its valid target). The result is the mean over
    the scales used.

    Args:
      pred, target: float ``[B, T, H, W]``, ``T >= 2``.
      mask: bool ``[B, T, H, W]``.
      trim: fraction of the largest residuals dropped at each scale.
      scales: number of temporal scales.
      decay: weight ratio between consecutive scales.
      max_change: threshold on the target's temporal change, as a fraction of
        the frame's depth range.

    Returns:
      float32 scalar.
    """
    pred, target, mask = _check_inputs(pred, target, mask, rank=4)
    num_frames = pred.shape[1]
    strides = [2**k for k in range(scales) if 2**k < num_frames]
    if not strides:
        raise ValueError("temporal gradient matching needs clips of T >= 2 frames and scales >= 1, "
                         f"got T={num_frames}, scales={scales}.")
    # Frames without valid pixels get a threshold of -inf, which rejects every pixel.
    lo = jnp.min(jnp.where(mask, target, jnp.inf), axis=(2, 3))
    hi = jnp.max(jnp.where(mask, target, -jnp.inf), axis=(2, 3))
    threshold = (hi - lo) * max_change  # [B, T]

    total = jnp.zeros((), jnp.float32)
    for k, stride in enumerate(strides):
        p, t, m = pred[:, ::stride], target[:, ::stride], mask[:, ::stride]
        dp = p[:, 1:] - p[:, :-1]
        dt = t[:, 1:] - t[:, :-1]
        steady = jnp.abs(dt) < threshold[:, ::stride][:, 1:, None, None]
        valid = m[:, 1:] & m[:, :-1] & steady
        total += trimmed_mae(dp, dt, valid, trim=trim) * decay**k
    return total / len(strides)


def video_depth_loss(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    *,
    alpha: float = 0.5,
    scales: int = 4,
    trim: float = 0.0,
    stable_scale: float = 10.0,
) -> dict[str, jax.Array]:
    """The video training loss (official ``VideoDepthLoss`` with its defaults).

    ``spatial`` is the scale-and-shift-invariant loss over all ``B * T``
    frames; ``stable`` is ``stable_scale`` times the single-scale temporal
    gradient matching of ``pred`` after one least-squares scale/shift per clip
    onto ``target``. (The official fit adds 1e-6 to the determinant and falls
    back to ``(0, 0)`` rather than ``(1, 0)``; neither matters, since a singular
    clip is constant on its valid pixels and has no temporal gradient.)

    Args:
      pred, target: float ``[B, T, H, W]`` (relative depth / disparity), ``T >= 2``.
      mask: bool ``[B, T, H, W]``, the pixels with valid ground truth.
      alpha: weight of the spatial gradient term.
      scales: number of spatial gradient scales.
      trim: fraction of the largest residuals dropped (spatial and temporal).
      stable_scale: weight of the temporal term.

    Returns:
      float32 scalars ``{"spatial", "stable", "total"}``.
    """
    pred, target, mask = _check_inputs(pred, target, mask, rank=4)
    spatial = image_depth_loss(pred, target, mask, alpha=alpha, scales=scales, trim=trim)["spatial"]
    scale, shift = jax.vmap(scale_and_shift)(pred, target, mask)
    aligned = scale[:, None, None, None] * pred + shift[:, None, None, None]
    stable = stable_scale * temporal_gradient_matching_loss(aligned, target, mask, trim=trim, scales=1)
    return {"spatial": spatial, "stable": stable, "total": spatial + stable}


def image_depth_loss(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    *,
    alpha: float = 0.5,
    scales: int = 4,
    trim: float = 0.0,
) -> dict[str, jax.Array]:
    """The spatial loss alone, for image batches (e.g. distillation, ``T = 1``).

    Returns the same keys as ``video_depth_loss`` (``stable`` is 0) so both
    kinds of batch log and reduce alike.

    Args:
      pred, target: float ``[B, T, H, W]``, any ``T``.
      mask: bool ``[B, T, H, W]``.
      alpha, scales, trim: as in ``video_depth_loss``.

    Returns:
      float32 scalars ``{"spatial", "stable", "total"}``.
    """
    pred, target, mask = _check_inputs(pred, target, mask, rank=4)
    b, t, h, w = pred.shape
    spatial = trimmed_procrustes_loss(
        pred.reshape(b * t, h, w), target.reshape(b * t, h, w), mask.reshape(b * t, h, w),
        alpha=alpha, scales=scales, trim=trim)
    return {"spatial": spatial, "stable": jnp.zeros((), jnp.float32), "total": spatial}


def per_group(loss: Callable[..., dict[str, jax.Array]], groups: int) -> Callable[..., dict[str, jax.Array]]:
    """``loss(pred, target, mask, **kwargs)`` over ``[B, ...]`` as the official multi-GPU training has it.

    The clips form ``groups`` equal consecutive groups (one GPU's batch each); each group's
    loss is computed on its own, trimming its own residuals, and the terms are averaged over
    the groups (DDP averages the GPUs' gradients). With the clip axis split over devices by
    group, every sort stays on its device. ``groups = 1`` is ``loss`` itself.
    """
    if groups == 1:
        return loss

    def grouped(pred: jax.Array, target: jax.Array, mask: jax.Array, **kwargs) -> dict[str, jax.Array]:
        if pred.shape[0] % groups:
            raise ValueError(f"{pred.shape[0]} clips do not split into {groups} loss groups; make the batch size "
                             "a multiple of loss.clip_groups")
        split = lambda a: a.reshape(groups, a.shape[0] // groups, *a.shape[1:])  # noqa: E731
        terms = jax.vmap(functools.partial(loss, **kwargs))(split(pred), split(target), split(mask))
        return {k: jnp.mean(v) for k, v in terms.items()}

    return grouped
