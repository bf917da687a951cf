"""Frames split over 16 devices (one 16-frame clip) train like one device: a subprocess with 16 CPU devices.

(The layouts of the train step on 8-device meshes are checked in ``test_train_step.py``.)
"""

import subprocess
import sys
import textwrap

_COMMON = """
import jax, numpy as np
import jax.numpy as jnp
from flax import nnx
jax.config.update("jax_default_matmul_precision", "highest")
from vda_jax.config import ModelConfig
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.train import sharding
from vda_jax.train.checkpoints import flat_arrays
from vda_jax.train.config import default_config
from vda_jax.train.optimizer import make_optimizer
from vda_jax.train.state import abstract_train_state, create_train_state, trained_groups
from vda_jax.train.step import StepOptions, jit_train_step

CONFIG = ModelConfig(encoder="custom", embed_dim=32, depth=4, num_heads=2, pos_embed_grid=4,
                     intermediate_layers=(0, 1, 2, 3), features=32, out_channels=(16, 16, 32, 32))
optimizer = default_config().optimizer
optimizer.lr, optimizer.warmup_steps, optimizer.eps = 1e-4, 0, 1e-3
TX = make_optimizer(optimizer, total_steps=10, groups=trained_groups(False))


def setup(model, mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    graphdef, abstract = abstract_train_state(model, TX, train_encoder=False)
    return mesh, graphdef, abstract, sharding.state_shardings(abstract, mesh, sharding.TENSOR_RULES)
"""

_FRAMES_SPLIT = """
model = VideoDepthAnything(CONFIG, rngs=nnx.Rngs(0))
# The head starts at zero-initialised temporal outputs; give them weights so the step
# exercises temporal attention across the frames split over devices.
for layer in model.head.temporal:
    layer.proj_out.kernel.set_value(0.02 * jax.random.normal(jax.random.key(1), layer.proj_out.kernel.shape))
rng = np.random.default_rng(0)
shape = (1, 16, 28, 42)
clips = {"frames": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
         "depth": rng.uniform(1.0, 10.0, shape).astype(np.float32), "mask": rng.random(shape) > 0.1}


def one_step(mesh_shape, frames_per_clip):
    mesh, graphdef, _, shardings = setup(model, mesh_shape)
    state = create_train_state(model, TX, train_encoder=False, shardings=shardings)
    step = jit_train_step(graphdef, StepOptions(frames_per_clip=frames_per_clip), shardings, mesh)
    batch = sharding.global_batch(clips, mesh, split_frames=frames_per_clip > 0)
    state, metrics = step(state, batch)
    return jax.device_get(flat_arrays(state)), jax.device_get(metrics), batch["frames"]


expected, expected_metrics, _ = one_step((1, 1, 1), 0)
updated, metrics, frames = one_step((16, 1, 1), 16)
assert frames.shape == (16, 28, 42, 3) and len(frames.sharding.device_set) == 16, frames.sharding
# The loss terms are float32 means over 16 x 28 x 42 pixels whose summation order the layout
# changes: rounding stays near log2(n) * 2**-24 * (their conditioning, ~10) ~ 1e-5 (2e-7 with
# AVX-512, 3e-6 with AVX2 or SSE4.2 code); attention over the wrong frames or positions moves them
# by more than 1e-2.
for name in ("loss", "spatial", "stable"):
    np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=2e-5, err_msg=name)
# Per parameter, this random model's gradients are sums with heavy cancellation, so their rounding is
# not small relative to themselves (5% of the Adam updates differ by more than 1e-7); the update
# *direction* is robust: 1 - cos <= 1e-4 allows a perturbation of up to ~1.4% of the update vector's
# norm (measured: 4e-6, i.e. 0.3%), and so 1.4% on the gradient norm (measured 4e-4 to 6e-4), where
# a wrong layout perturbs both by O(1).
params = jax.device_get(flat_arrays(nnx.state(model)))


def update(state):  # the step's change of every trained parameter, one float64 vector
    return np.concatenate([np.ravel(state[p] - params[p.removeprefix("model.")]).astype(np.float64)
                           for p in sorted(state) if p.removeprefix("model.") in params and p.startswith("model.")])


new_update, old_update = update(updated), update(expected)
cos = new_update @ old_update / np.linalg.norm(new_update) / np.linalg.norm(old_update)
assert 1 - cos <= 1e-4, cos
np.testing.assert_allclose(metrics["grad_norm"], expected_metrics["grad_norm"], rtol=1.4e-2)
print("equal", {k: float(v) for k, v in metrics.items()})
"""




def test_frames_split_over_16_devices_train_like_one_device(child_env):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_COMMON + _FRAMES_SPLIT)], env=child_env(16),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "equal" in result.stdout
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-3000:]
