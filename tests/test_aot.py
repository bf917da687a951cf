"""The accelerators' own compilers on our programs, without the accelerators (``pip install -e ".[aot]"``).

Marked ``aot``: deselected where JAX's CUDA compiler or libtpu is missing (``tests/conftest.py``);
``.ci/run`` runs them in a second environment with the extra. Each program is the real one
(``vda_jax.aot.programs``) at the smallest shapes that still shard: the tiny training config on
a 2 x 2 (data x fsdp) mesh, and the window step of 2 videos over 2 devices.
"""

import contextlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vda_jax.aot import programs, report
from vda_jax.aot.targets import get_target
from vda_jax.devices import GIB, Platform
from vda_jax.inference.preprocess import network_size
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.train import sharding
from vda_jax.train.config import load_config, model_config_from
from vda_jax.train.optimizer import make_optimizer
from vda_jax.train.state import abstract_train_state, trained_groups
from vda_jax.train.step import training_model

pytestmark = pytest.mark.aot

TARGETS = ("h100:4", "tpu-v5e:2x2")
FRAME, INPUT_SIZE = (56, 56), 56
# bf16: cuDNN's fused attention takes no float32. A frozen encoder, as the paper's: cuDNN trains on
# no odd sequence (its 17 tokens) but runs them forward. Clips of 8 frames on a data 2 x fsdp 2
# mesh; fsdp splits every array of at least 2**10 elements.
OVERRIDES = ["precision=bf16", "train_encoder=False", "mesh.data=2", "mesh.fsdp=2", "sharding.min_fsdp_size=1024",
             "batch_size=4", "data.image_ratio=0"]


@pytest.fixture(scope="module")
def config():
    return load_config("synthetic_tiny", OVERRIDES)


@contextlib.contextmanager
def stderr_to(path):
    """Redirects the process's stderr (file descriptor 2, where XLA logs) to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture(scope="module", params=TARGETS)
def train_step(request, config, tmp_path_factory):
    """(target, traced, compiled, compiler options, XLA's log) of the tiny config's train step."""
    target = get_target(request.param)
    log = tmp_path_factory.mktemp("xla") / "stderr.txt"
    with stderr_to(log):
        traced = programs.train_step(config, target)
        compiled, options = programs.compile_for(traced.lower(), target)
    return target, traced, compiled, options, log.read_text()


def _state_bytes_per_device(config, target) -> int:
    """The bytes of one device's shard of every train-state array, from the sharding rules alone."""
    mesh = programs.train_mesh(config, target)
    model = nnx.eval_shape(lambda: training_model(VideoDepthAnything(model_config_from(config.model)),
                                                  config.precision, mesh))
    tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
    _, abstract = abstract_train_state(model, tx, train_encoder=config.train_encoder)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.tensor_rules, config.sharding.min_fsdp_size)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def test_train_step_compiles_sharded(train_step, config):
    target, traced, compiled, options, log = train_step
    figures = report.analyse(traced, compiled, target, 0.0)
    assert figures.devices == 4 and figures.fits
    # XLA keeps the layouts the rules give (a full rematerialisation would replicate a tensor).
    assert "Involuntary full rematerialization" not in log
    b, t, (h, w) = config.batch_size, config.data.clip_frames, config.data.crop_size
    batch = b * t * h * w * (3 + 4 + 1) // 4  # uint8 frames, float32 depth, bool mask over data x fsdp
    expected = _state_bytes_per_device(config, target) + batch
    # The partitioned program's parameters are each device's shards, as the rules cut them.
    signature = compiled.as_text().split("\nENTRY ", 1)[1].split(") -> ", 1)[0]
    assert report.array_bytes(signature) == expected
    if target.platform.kind == "cuda":
        assert figures.fused_attention_calls == config.model.depth  # one per encoder block
        assert figures.arguments_bytes == expected  # GPU buffers are unpadded
    else:  # XLA's attention; TPU layouts pad small arrays to (8, 128) tiles
        assert figures.fused_attention_calls == 0 and figures.arguments_bytes >= expected
    # Gradients are reduced over the batch axes, and the fsdp shards gathered where they are used.
    assert "all-gather" in figures.collectives and {"all-reduce", "reduce-scatter"} & set(figures.collectives)
    assert figures.flops > 0 and figures.roofline_step_seconds > 0
    assert options in ({}, programs.CUBLAS_GEMMS)


def test_options_follow_the_target_not_the_host(tiny_model):
    h100, v5e = get_target("h100:1"), get_target("tpu-v5e:2x2")
    assert h100.platform == Platform("cuda", 80 * GIB) and v5e.platform == Platform("tpu", 16 * GIB)
    gpu_model = compute_model(tiny_model, devices=h100.devices)
    assert (gpu_model.encoder.dtype, gpu_model.attention, gpu_model.chunk_bytes) == (jnp.bfloat16, "cudnn", 2 * GIB)
    tpu_model = compute_model(tiny_model, "fp32", devices=v5e.devices)
    assert (tpu_model.encoder.dtype, tpu_model.attention, tpu_model.chunk_bytes) == (jnp.float32, "xla", 16 * GIB // 40)
    with pytest.raises(ValueError, match="must be of one kind"):
        Platform.of([*h100.devices, *jax.devices()[:1]])


@pytest.mark.parametrize("part", programs.WINDOW_PARTS)
@pytest.mark.parametrize("target_name", TARGETS)
def test_window_step_compiles(target_name, part, config):
    target = get_target(target_name)
    model = model_config_from(config.model)
    traced = programs.window_step(model, "bf16", FRAME, network_size(FRAME, INPUT_SIZE), 2, target, part)
    compiled, _ = programs.compile_for(traced.lower(), target)
    figures = report.analyse(traced, compiled, target, 0.0)
    assert figures.devices == 2 and figures.fits
    # The encoder's attention (17 tokens) is cuDNN's on CUDA; the temporal layers' stays two einsums.
    assert (figures.fused_attention_calls > 0) == (part == "encode" and target.platform.kind == "cuda")
    assert not figures.collectives  # each device runs its own videos


@pytest.mark.parametrize("target_name", TARGETS)
def test_memory_plan_script(target_name, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "memory_plan.py")
    result = subprocess.run([sys.executable, script, "--target", target_name, "--config", "synthetic_tiny",
                             "--only", "stream", "--frame", "56x56", "--input-size", "56", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [(r["job"], r["precision"]) for r in rows] == [("stream", "fp32"), ("stream", "bf16")]
    for row in rows:
        assert row["target"] == target_name and row["fits"] and row["devices"] == 1
        assert row["per_device_bytes"] == row["arguments_bytes"] + row["outputs_bytes"] + row["temporaries_bytes"]
        assert row["device_memory_bytes"] == get_target(target_name).accelerator.memory_bytes
        assert np.isfinite(row["roofline_step_seconds"]) and row["flops"] > 0
