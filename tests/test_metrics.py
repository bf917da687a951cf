"""Benchmark metrics against the official values, closed forms and properties."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from vda_jax.eval import metrics
from vda_jax.ops.align import scale_and_shift

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "eval.npz") as f:
        return dict(f)


def test_depth_metrics_match_official(golden):
    got = metrics.depth_metrics(golden["pred"], golden["gt"], max_depth=float(golden["max_depth"]))
    names = {"abs_relative_difference": "abs_rel", "rmse_linear": "rmse", "delta1_acc": "delta1"}
    want = dict(zip((names[str(n)] for n in golden["metric_names"]), golden["metric_values"]))
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


def test_tae_matches_official(golden):
    tae = metrics.temporal_alignment_error(golden["pred"], golden["gt"], golden["K"], golden["poses"],
                                           max_depth=float(golden["max_depth"]))
    np.testing.assert_allclose(tae, golden["tae"], rtol=1e-6)


def _plane_scene(num_frames: int = 4, h: int = 24, w: int = 32):
    """A fronto-parallel wall at z = 6 seen by a camera moving right and forward."""
    intrinsics = np.array([[28.0, 0.0, 15.5], [0.0, 28.0, 11.5], [0.0, 0.0, 1.0]])
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    poses[:, 0, 3] = 0.3 * np.arange(num_frames)
    poses[:, 2, 3] = 0.5 * np.arange(num_frames)
    gt = np.broadcast_to((6.0 - poses[:, 2, 3])[:, None, None], (num_frames, h, w)).astype(np.float32)
    return gt, intrinsics, poses


def test_tae_of_ground_truth_on_a_static_scene_is_zero():
    gt, intrinsics, poses = _plane_scene()
    disparity = 2.0 / gt + 0.1  # any positive scale and shift of the true disparity
    tae = metrics.temporal_alignment_error(disparity, gt, intrinsics, poses, max_depth=10.0)
    assert tae < 1e-4
    # Reading the poses the wrong way round (world-to-camera) must show up.
    wrong = metrics.temporal_alignment_error(disparity, gt, intrinsics, np.linalg.inv(poses), max_depth=10.0)
    assert wrong > 5.0


def test_depth_metrics_of_aligned_ground_truth_are_perfect():
    gt, _, _ = _plane_scene()
    gt = gt * np.linspace(0.8, 1.2, gt.shape[-1], dtype=np.float32)  # some depth variation
    disparity = 3.0 / gt + 0.5
    gt[0] = 0.0  # a frame without ground truth is skipped
    disparity[1:, :3] = 100.0  # corrupt rows outside the crop
    disparity[1:, :, -2:] = 0.01  # and columns outside the mask
    mask = np.ones(gt.shape, bool)
    mask[..., -2:] = False
    got = metrics.depth_metrics(disparity, gt, max_depth=10.0, mask=mask, crop=(3, None, 0, None))
    np.testing.assert_allclose([got["abs_rel"], got["rmse"], got["delta1"]], [0.0, 0.0, 1.0], atol=1e-5)
    spoiled = metrics.depth_metrics(disparity, gt, max_depth=10.0)
    assert spoiled["abs_rel"] > 0.01 and spoiled["delta1"] < 1.0


def test_metrics_reject_bad_input():
    gt, intrinsics, poses = _plane_scene()
    with pytest.raises(ValueError, match="valid"):
        metrics.depth_metrics(1.0 / gt, gt, max_depth=1.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.depth_metrics(1.0 / gt[:, :-1], gt, max_depth=10.0)
    with pytest.raises(ValueError, match="poses"):
        metrics.temporal_alignment_error(1.0 / gt, gt, intrinsics, poses[:-1], max_depth=10.0)


def test_scale_and_shift_recovers_known_values():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.1, 3.0, (3, 8, 10)).astype(np.float32)
    mask = rng.uniform(size=pred.shape) > 0.3
    target = np.where(mask, 2.5 * pred - 0.75, rng.normal(size=pred.shape)).astype(np.float32)
    scale, shift = jax.jit(scale_and_shift)(pred, target, mask)
    np.testing.assert_allclose([scale, shift], [2.5, -0.75], rtol=1e-6)
    # Per clip with vmap, and the identity where the system is singular.
    scales, shifts = jax.vmap(scale_and_shift)(
        pred, target, np.stack([mask[0], np.zeros_like(mask[1]), mask[2]]))
    np.testing.assert_allclose(scales, [2.5, 1.0, 2.5], rtol=1e-6)
    np.testing.assert_allclose(shifts, [-0.75, 0.0, -0.75], rtol=1e-6, atol=1e-6)
    const_scale, const_shift = scale_and_shift(np.ones_like(pred), target, mask)
    assert (float(const_scale), float(const_shift)) == (1.0, 0.0)
