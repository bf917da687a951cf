"""Benchmark metrics of Video Depth Anything, as in the official ``benchmark/eval``.

A predicted disparity video is scored against metric ground-truth depth after
one least-squares scale and shift for the whole video, fitted in disparity
space on the pixels whose ground truth lies in ``(1e-3, max_depth)``. The
aligned disparity is clipped to >= 1e-3, inverted and clipped to
``[1e-3, max_depth]``. Then:

* ``depth_metrics``: AbsRel, RMSE and delta1 per frame over the valid pixels,
  averaged over the frames that have any;
* ``temporal_alignment_error`` (TAE): each frame's aligned depth is reprojected
  into the next frame with the ground-truth pose and compared with that frame's
  depth by AbsRel, both ways, averaged over pairs and given in percent.

Host-side NumPy in float64 like the official code; only the scale/shift fit
runs in float32 (``vda_jax.ops.align``, about 1e-7 relative).
"""

from __future__ import annotations

import numpy as np

from vda_jax.ops.align import scale_and_shift

_MIN_DEPTH = 1e-3
Crop = tuple[int | None, int | None, int | None, int | None]


def _crop(x: np.ndarray, crop: Crop | None) -> np.ndarray:
    if crop is None:
        return x
    top, bottom, left, right = crop
    return x[..., top:bottom, left:right]


def _check_video(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None) -> None:
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must both be [T, H, W] of one shape, got {pred.shape} and {gt.shape}.")
    if mask is not None and mask.shape != gt.shape:
        raise ValueError(f"mask must have the shape of gt {gt.shape}, got {mask.shape}.")


def aligned_depth(pred_disparity: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray, max_depth: float) -> np.ndarray:
    """Aligns a disparity video to ground truth and converts it to depth.

    Args:
      pred_disparity: ``[T, H, W]``, the model's relative disparity.
      gt_depth: ``[T, H, W]`` metric depth.
      valid: bool ``[T, H, W]``, the pixels used for the fit.
      max_depth: depth cap of the benchmark.

    Returns:
      float64 ``[T, H, W]`` depth in ``[1e-3, max_depth]``.
    """
    if not valid.any():
        raise ValueError("no ground-truth pixel is valid for the alignment; check gt units and max_depth.")
    disparity = np.clip(pred_disparity.astype(np.float32), _MIN_DEPTH, None)
    gt_disparity = 1.0 / (gt_depth.astype(np.float64) + 1e-8)
    scale, shift = scale_and_shift(disparity, gt_disparity.astype(np.float32), valid)
    aligned = np.clip(float(scale) * disparity.astype(np.float64) + float(shift), _MIN_DEPTH, None)
    return np.clip(1.0 / aligned, _MIN_DEPTH, max_depth)


def valid_depth(gt_depth: np.ndarray, max_depth: float, mask: np.ndarray | None = None) -> np.ndarray:
    """The benchmark's valid pixels: ``1e-3 < gt < max_depth`` (and ``mask``), bool ``[T, H, W]``."""
    gt = gt_depth.astype(np.float64)
    valid = (gt > _MIN_DEPTH) & (gt < max_depth)
    return valid if mask is None else valid & mask.astype(bool)


def depth_metrics(
    pred_disparity: np.ndarray,
    gt_depth: np.ndarray,
    *,
    max_depth: float,
    mask: np.ndarray | None = None,
    crop: Crop | None = None,
) -> dict[str, float]:
    """AbsRel, RMSE and delta1 of one video (official ``eval.py``).

    Args:
      pred_disparity: ``[T, H, W]`` predicted relative disparity.
      gt_depth: ``[T, H, W]`` metric depth; 0 marks missing values.
      max_depth: depth cap of the benchmark (e.g. 80 for KITTI, 10 indoors).
      mask: optional bool ``[T, H, W]`` restricting the valid pixels.
      crop: optional ``(top, bottom, left, right)`` slice bounds applied to
        every input before anything else.

    Returns:
      ``{"abs_rel", "rmse", "delta1"}`` as Python floats.
    """
    pred, gt = _crop(np.asarray(pred_disparity), crop), _crop(np.asarray(gt_depth), crop)
    mask = None if mask is None else _crop(np.asarray(mask), crop)
    _check_video(pred, gt, mask)
    valid = valid_depth(gt, max_depth, mask)
    depth = aligned_depth(pred, gt, valid, max_depth)
    gt = gt.astype(np.float64)

    frames = valid.any(axis=(1, 2))
    depth, gt, valid = depth[frames], gt[frames], valid[frames]
    count = valid.sum(axis=(1, 2))
    safe_gt = np.where(valid, gt, 1.0)
    abs_rel = np.where(valid, np.abs(depth - gt) / safe_gt, 0.0).sum(axis=(1, 2)) / count
    rmse = np.sqrt(np.where(valid, (depth - gt) ** 2, 0.0).sum(axis=(1, 2)) / count)
    ratio = np.maximum(depth / safe_gt, safe_gt / depth)
    delta1 = (valid & (ratio < 1.25)).sum(axis=(1, 2)) / count
    return {"abs_rel": float(abs_rel.mean()), "rmse": float(rmse.mean()), "delta1": float(delta1.mean())}


def _reprojection_abs_rel(
    depth_src: np.ndarray, depth_dst: np.ndarray, dst_from_src: np.ndarray, intrinsics: np.ndarray, mask_dst: np.ndarray
) -> float:
    """AbsRel of ``depth_dst`` against ``depth_src`` warped into the destination view.

    Each source pixel is lifted to 3D, moved by the 4x4 ``dst_from_src`` and
    splatted on the nearest destination pixel with its new depth. Where several
    land on one pixel the last in row-major source order wins (what the
    official scatter does on CPU). Pixels where the splat and ``depth_dst`` are
    positive and ``mask_dst`` holds are compared; 0 if there are none.
    """
    h, w = depth_src.shape
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    points = np.stack([(xs - cx) * depth_src / fx, (ys - cy) * depth_src / fy, depth_src], axis=-1).reshape(-1, 3)
    points = points @ dst_from_src[:3, :3].T + dst_from_src[:3, 3]
    x, y, z = points.T
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(x * fx / z + cx)
        v = np.round(y * fy / z + cy)
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    target = (v[inside] * w + u[inside]).astype(np.int64)

    winner = np.full(h * w, -1, np.int64)
    np.maximum.at(winner, target, np.flatnonzero(inside))
    warped = np.where(winner >= 0, z[winner], 0.0).reshape(h, w)

    valid = (warped > 0) & (depth_dst > 0) & mask_dst
    if not valid.any():
        return 0.0
    return float(np.mean(np.abs(depth_dst[valid] - warped[valid]) / depth_dst[valid]))


def temporal_alignment_error(
    pred_disparity: np.ndarray,
    gt_depth: np.ndarray,
    intrinsics: np.ndarray,
    cam_to_world: np.ndarray,
    *,
    max_depth: float,
    mask: np.ndarray | None = None,
    crop: Crop | None = None,
) -> float:
    """Temporal alignment error (TAE, in percent) of one video (official ``eval_tae.py``).

    Only the prediction is reprojected; the ground truth serves the
    scale/shift fit. As in the official code, ``crop`` does not shift the
    principal point, and pair ``(t, t + 1)`` uses the intrinsics of frame ``t``.

    Args:
      pred_disparity: ``[T, H, W]`` predicted relative disparity, ``T >= 2``.
      gt_depth: ``[T, H, W]`` metric depth; 0 marks missing values.
      intrinsics: ``[3, 3]`` or per frame ``[T, 3, 3]`` pinhole matrices.
      cam_to_world: ``[T, 4, 4]`` camera-to-world poses.
      max_depth: depth cap of the benchmark.
      mask: optional bool ``[T, H, W]``: pixels of a frame that may be scored
        when it is the destination of a reprojection.
      crop: optional ``(top, bottom, left, right)`` slice bounds applied to
        every image input before anything else.

    Returns:
      TAE x 100 as a Python float.
    """
    pred, gt = _crop(np.asarray(pred_disparity), crop), _crop(np.asarray(gt_depth), crop)
    mask = None if mask is None else _crop(np.asarray(mask), crop).astype(bool)
    _check_video(pred, gt, mask)
    num_frames = pred.shape[0]
    intrinsics = np.asarray(intrinsics, np.float64)
    cam_to_world = np.asarray(cam_to_world, np.float64)
    if num_frames < 2 or cam_to_world.shape != (num_frames, 4, 4):
        raise ValueError(f"TAE needs T >= 2 frames and [T, 4, 4] poses, got {pred.shape} and {cam_to_world.shape}.")
    if intrinsics.shape not in ((3, 3), (num_frames, 3, 3)):
        raise ValueError(f"intrinsics must be [3, 3] or [T, 3, 3] with T={num_frames}, got {intrinsics.shape}.")
    intrinsics = np.broadcast_to(intrinsics, (num_frames, 3, 3))
    if mask is None:
        mask = np.ones(pred.shape, bool)

    depth = aligned_depth(pred, gt, valid_depth(gt, max_depth), max_depth)
    errors = []
    for t in range(num_frames - 1):
        next_from_this = np.linalg.inv(cam_to_world[t + 1]) @ cam_to_world[t]
        this_from_next = np.linalg.inv(next_from_this)
        errors.append(_reprojection_abs_rel(depth[t], depth[t + 1], next_from_this, intrinsics[t], mask[t + 1]))
        errors.append(_reprojection_abs_rel(depth[t + 1], depth[t], this_from_next, intrinsics[t], mask[t]))
    return 100.0 * float(np.mean(errors))
