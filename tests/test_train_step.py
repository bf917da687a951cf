"""The sharded train step: same result on any mesh, frozen encoder, sharding rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vda_jax.assets import DEMO_MODEL
from vda_jax.checkpoint import load_checkpoint
from vda_jax.train import losses, sharding
from vda_jax.train.checkpoints import flat_arrays
from vda_jax.train.config import default_config
from vda_jax.train.optimizer import make_optimizer
from vda_jax.train.state import abstract_train_state, create_train_state, trained_groups
from vda_jax.train.step import StepOptions, depth_losses, jit_train_step, loss_and_grads, training_model

LR = 1e-4
# 8 clips (one per device on the widest mesh) of 2 frames. At this size the tiny model's
# float32 noise between batch shapes (~1e-6, XLA picks kernels per shape) stays far below
# the scale of the loss's sort-based median and of the gradients.
BATCH, FRAMES, HEIGHT, WIDTH = 8, 2, 42, 56


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    shape = (BATCH, FRAMES, HEIGHT, WIDTH)
    return {"frames": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
            "depth": rng.uniform(1.0, 10.0, shape).astype(np.float32),
            "mask": rng.random(shape) > 0.1}


def one_step(model, batch, mesh_shape, options):
    """(state before, state after, metrics) of one train step on a (data, fsdp, tensor) mesh."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    model = training_model(model, "fp32", mesh)
    config = default_config().optimizer
    # The first step moves parameters by up to LR. A large eps makes Adam's update a smooth
    # function of small gradients (g / (|g| + eps)), so float32 noise in gradients that are ~0
    # cannot flip their update's sign.
    config.lr, config.warmup_steps, config.eps = LR, 0, 1e-3
    tx = make_optimizer(config, total_steps=10, groups=trained_groups(False))
    graphdef, abstract = abstract_train_state(model, tx, train_encoder=False)
    shardings = sharding.state_shardings(abstract, mesh, sharding.TENSOR_RULES)
    state = create_train_state(model, tx, train_encoder=False, shardings=shardings)
    before = jax.device_get(flat_arrays(state))
    step = jit_train_step(graphdef, options, shardings, mesh)
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    return before, jax.device_get(flat_arrays(state)), jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference(tiny_model, batch):
    return one_step(tiny_model, batch, (1, 1, 1), StepOptions())


@pytest.mark.parametrize("mesh_shape, options", [
    ((8, 1, 1), StepOptions()),
    ((4, 2, 1), StepOptions()),
    # Rematerialising and per-frame chunks (laid out device-major) change nothing either.
    ((1, 8, 1), StepOptions(remat=True, frames_per_chunk=1)),
    ((2, 2, 2), StepOptions()),  # tensor parallel: heads and MLP features split, FSDP gathered at use
], ids=["8x1", "4x2", "1x8-remat-chunks", "2x2x2"])
def test_sharded_step_matches_one_device(tiny_model, batch, reference, mesh_shape, options, capfd):
    _, expected, expected_metrics = reference
    _, updated, metrics = one_step(tiny_model, batch, mesh_shape, options)
    # XLA kept the layouts the rules give (it logs when it must replicate a tensor instead).
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    for path, value in expected.items():
        if path.startswith("model."):
            np.testing.assert_allclose(updated[path], value, rtol=1e-5, atol=1e-8, err_msg=path)


def test_remat_keeps_loss_and_gradients(batch):
    """Per-module remat (ViT blocks included): same loss, same gradients.

    On the bundled demo model: every module kind of the fixture model's, trained temporal layers (a
    fresh model's start at zero), and 4 ViT blocks instead of 12 (a third of the compile).
    """
    clips = {k: v[:2] for k, v in batch.items()}
    graphdef, params = nnx.split(load_checkpoint(DEMO_MODEL))

    def run(opts):
        return jax.device_get(jax.jit(lambda p, b: loss_and_grads(nnx.merge(graphdef, p), b, opts))(params, clips))

    terms, grads = run(StepOptions(train_encoder=True))
    remat_terms, remat_grads = run(StepOptions(train_encoder=True, remat=True))
    for name, value in terms.items():
        np.testing.assert_allclose(remat_terms[name], value, rtol=1e-6, err_msg=name)
    flat, remat_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(remat_grads))
    assert any(path[0] == "encoder" for path in flat) and flat.keys() == remat_flat.keys()
    norms = {path: np.linalg.norm(np.asarray(value[...])) for path, value in flat.items()}
    total = np.sqrt(sum(n ** 2 for n in norms.values()))
    for path, value in flat.items():
        # Remat recomputes the forward pass in other fusions, so the gradients differ by float32 rounding
        # amplified through the backward pass: a relative L2 error per array of 6.5e-5 at most measured
        # (~550 x 2^-23). Element by element, sums that cancel make it unbounded. A wrong rematerialisation
        # differs by O(1). An array whose exact gradient is zero holds rounding noise only (the last bias:
        # the loss is invariant to a shift of the depth), so errors below 1e-6 of the whole gradient's norm
        # pass too.
        difference = np.linalg.norm(remat_flat[path][...] - np.asarray(value[...]))
        assert difference <= 1e-3 * norms[path] + 1e-6 * total, (path, difference, norms[path], total)


def test_frozen_encoder(reference):
    before, after, _ = reference
    encoder = [k for k in before if k.startswith("model.encoder.")]
    head = [k for k in before if k.startswith("model.head.") and "pe" not in k.split(".")]
    assert encoder and head
    for k in encoder:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    moved = max(float(np.max(np.abs(after[k] - before[k]))) for k in head)
    assert LR / 10 < moved < LR
    optimizer = [k for k in after if k.startswith("optimizer.")]
    assert not any(".encoder." in k for k in optimizer)
    # Two Adam moments per head parameter, plus scalar step counters.
    moments = sum(after[k].size for k in optimizer if after[k].ndim)
    assert moments == 2 * sum(before[k].size for k in head)


def test_unfrozen_encoder_has_optimizer_state(tiny_model):
    tx = make_optimizer(default_config().optimizer, total_steps=1000, groups=trained_groups(True))
    _, state = abstract_train_state(tiny_model, tx, train_encoder=True)
    groups = {k.split(".")[4] for k in flat_arrays(state) if k.startswith("optimizer.opt_state.1.inner_states.")}
    assert groups == {"encoder", "head", "temporal"}


def test_partition_spec_rules():
    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.TENSOR_RULES
    # fsdp takes the largest dimension it divides that no rule took.
    assert sharding.partition_spec("head.conv.kernel", (3, 3, 64, 32), mesh) == P(None, None, "fsdp", None)
    assert sharding.partition_spec("encoder.blocks.0.mlp.fc1.kernel", (64, 256), mesh, rules) == P("fsdp", "tensor")
    assert sharding.partition_spec("opt.mu.encoder.blocks.0.mlp.fc2.kernel", (256, 64), mesh, rules) == \
        P("tensor", "fsdp")
    # Axes that do not divide a dimension are dropped; small arrays stay replicated.
    assert sharding.partition_spec("head.temporal.0.ff.proj.bias", (2, 3), mesh, rules) == P("fsdp", None)
    # Fused projections split heads / features, never their parts (q/k/v, GEGLU value/gate).
    assert sharding.partition_spec("encoder.blocks.0.attn.qkv.kernel", (64, 3, 64), mesh, rules) == \
        P("fsdp", None, "tensor")
    assert sharding.partition_spec("head.conv.kernel", (3, 3, 64, 32), mesh, min_fsdp_size=10**5) == P(*[None] * 4)
    with pytest.raises(ValueError, match="needs 4 devices but there are 8"):
        sharding.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="multiple of 4, or split frames"):
        sharding.global_batch({"x": np.zeros((6, 2))}, sharding.make_mesh(4, 1, 2))
    # Frames split over the devices: B*T must divide, not B.
    frames = sharding.global_batch({"x": np.zeros((2, 4, 3))}, sharding.make_mesh(8, 1, 1), split_frames=True)
    assert frames["x"].shape == (8, 3) and len(frames["x"].sharding.device_set) == 8
    with pytest.raises(ValueError, match="6 frames .* batch size x frames per clip a multiple of 8"):
        sharding.global_batch({"x": np.zeros((2, 3, 3))}, sharding.make_mesh(8, 1, 1), split_frames=True)


def test_image_batches_use_the_spatial_loss_on_disparity():
    rng = np.random.default_rng(1)
    depth = rng.uniform(1.0, 10.0, (3, 1, 14, 14)).astype(np.float32)
    mask = rng.random(depth.shape) > 0.2
    pred = rng.uniform(0.0, 1.0, depth.shape).astype(np.float32)
    batch = {"depth": depth, "mask": mask}
    terms = depth_losses(pred, batch, StepOptions(metric_depth=True))
    disparity = np.where(mask, 1.0 / depth, 0.0)
    expected = losses.image_depth_loss(pred, disparity, mask)
    np.testing.assert_allclose(terms["total"], expected["total"], rtol=1e-6)
    assert terms["stable"] == 0
    # Pseudo-labels are disparity already.
    np.testing.assert_allclose(depth_losses(pred, batch, StepOptions(metric_depth=False))["total"],
                               losses.image_depth_loss(pred, depth, mask)["total"], rtol=1e-6)
