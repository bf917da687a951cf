"""Training losses against the official PyTorch values and their defining properties."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest

from vda_jax.train import losses

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "loss.npz") as f:
        return dict(f)


def _video(seed: int, shape=(2, 4, 16, 20), holes: bool = True):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.5, 5.0, shape).astype(np.float32)
    pred = (0.7 * target + 0.3 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.uniform(size=shape) > 0.25 if holes else np.ones(shape, bool)
    return pred, target, mask


def _frames(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, *x.shape[2:])


def test_matches_official_losses(golden):
    pred, target, mask = golden["pred"], golden["target"], golden["mask"]
    video = jax.jit(losses.video_depth_loss)(pred, target, mask)
    image = jax.jit(losses.image_depth_loss)(pred, target, mask)
    procrustes = jax.jit(functools.partial(losses.trimmed_procrustes_loss, trim=0.2))(
        _frames(pred), _frames(target), _frames(mask))
    tgm = jax.jit(functools.partial(losses.temporal_gradient_matching_loss, trim=0.2, scales=4))(pred, target, mask)
    got = [video["spatial"], video["stable"], video["total"], image["spatial"], procrustes, tgm]
    want = [golden[k] for k in ("video_depth_loss_spatial", "video_depth_loss_stable", "video_depth_loss_total",
                                "video_depth_loss_spatial", "trimmed_procrustes_trim02", "tgm_trim02_scales4")]
    np.testing.assert_allclose(np.array(got, np.float64), np.array(want), rtol=1e-5)


def test_trimmed_mae_closed_form():
    residual = np.arange(1.0, 11.0, dtype=np.float32)  # 10 valid residuals 1..10
    pred = np.concatenate([residual, [100.0, 100.0]]).astype(np.float32)
    mask = np.arange(12) < 10
    trimmed = jax.jit(functools.partial(losses.trimmed_mae, trim=0.2))(pred, np.zeros(12, np.float32), mask)
    # The 8 smallest residuals, divided by the 10 valid ones.
    np.testing.assert_allclose(trimmed, sum(range(1, 9)) / 10, rtol=1e-6)
    np.testing.assert_allclose(losses.trimmed_mae(pred, np.zeros(12, np.float32), mask), 5.5, rtol=1e-6)


def test_spatial_loss_is_invariant_to_positive_scale_and_shift():
    pred, target, mask = map(_frames, _video(0))
    loss = jax.jit(functools.partial(losses.trimmed_procrustes_loss, trim=0.2))
    # With holes in the mask only the scale is free (the official median counts
    # masked-out pixels as zeros); a full mask also frees the shift.
    np.testing.assert_allclose(loss(3.0 * pred, target, mask), loss(pred, target, mask), rtol=1e-5)
    full = np.ones_like(mask)
    np.testing.assert_allclose(loss(3.0 * pred + 2.0, target, full), loss(pred, target, full), rtol=1e-5)


def test_video_loss_is_invariant_to_scale_and_shift_of_pred():
    pred, target, mask = _video(1, holes=False)
    loss = jax.jit(losses.video_depth_loss)
    ref, moved = loss(pred, target, mask), loss(0.25 * pred - 1.0, target, mask)
    for key in ("spatial", "stable", "total"):
        np.testing.assert_allclose(moved[key], ref[key], rtol=1e-4)
    assert ref["stable"] > 0


def test_zero_when_pred_equals_target():
    _, target, mask = _video(2)
    out = jax.jit(losses.video_depth_loss)(target, target, mask)
    np.testing.assert_allclose([out["spatial"], out["stable"], out["total"]], 0.0, atol=1e-5)


def test_masked_out_pixels_do_not_matter():
    pred, target, mask = _video(3)
    noise = np.random.default_rng(4).uniform(-50.0, 50.0, pred.shape).astype(np.float32)
    loss = jax.jit(losses.video_depth_loss)
    ref = loss(pred, target, mask)
    out = loss(np.where(mask, pred, noise), np.where(mask, target, -noise), mask)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6)


def test_gradients_finite_with_empty_frames_and_clips():
    pred, target, mask = _video(5)
    mask[0, 1] = False  # one empty frame
    mask[1] = False  # one empty clip

    def total(p):
        return losses.video_depth_loss(p, target, mask)["total"]

    value, grads = jax.jit(jax.value_and_grad(total))(pred)
    assert np.isfinite(value) and value > 0
    assert np.isfinite(grads).all()
    np.testing.assert_array_equal(np.asarray(grads)[~mask], 0.0)
    empty = losses.video_depth_loss(pred, target, np.zeros_like(mask))
    np.testing.assert_array_equal([empty[k] for k in ("spatial", "stable", "total")], 0.0)


def test_image_loss_takes_single_frames_and_video_loss_refuses_them():
    pred, target, mask = _video(6, shape=(3, 1, 16, 20))
    out = jax.jit(losses.image_depth_loss)(pred, target, mask)
    spatial = jax.jit(losses.trimmed_procrustes_loss)(*map(_frames, (pred, target, mask)))
    np.testing.assert_allclose(out["total"], spatial, rtol=1e-6)
    assert out["stable"] == 0 and out["total"] > 0
    with pytest.raises(ValueError, match="T >= 2"):
        jax.jit(losses.video_depth_loss)(pred, target, mask)
    with pytest.raises(ValueError, match="trim"):
        losses.trimmed_mae(pred, target, mask, trim=1.0)


def test_per_group_loss_is_the_official_per_gpu_loss_and_sorts_on_each_device(golden):
    """Two groups of one clip: each clip's official loss (its own trimming), averaged as DDP does."""
    pred, target, mask = golden["pred"], golden["target"], golden["mask"]
    loss = functools.partial(losses.video_depth_loss, trim=0.2)
    per_gpu = [jax.jit(loss)(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(2)]
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    grouped = jax.jit(functools.partial(losses.per_group(losses.video_depth_loss, 2), trim=0.2))
    args = [jax.device_put(a, split) for a in (pred, target, mask)]
    got = grouped(*args)
    for key in ("spatial", "stable", "total"):
        np.testing.assert_allclose(got[key], (per_gpu[0][key] + per_gpu[1][key]) / 2, rtol=1e-6, err_msg=key)
    # Unlike one group (the batch's residuals sorted together), nothing is gathered.
    assert "all-gather" not in grouped.lower(*args).compile().as_text()
    assert "all-gather" in jax.jit(functools.partial(loss)).lower(*args).compile().as_text()
    assert losses.per_group(loss, 1) is loss
    with pytest.raises(ValueError, match="clip_groups"):
        losses.per_group(loss, 3)(pred, target, mask)
