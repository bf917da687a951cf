"""Compute options of the model: attention implementations, precision, device-major frame chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vda_jax import precision
from vda_jax.config import model_config
from vda_jax.devices import GIB, MIB, Platform
from vda_jax.models.layers import attention, chunk_frames, default_attention, map_frames
from vda_jax.models.vda import (
    FrameChunks,
    VideoDepthAnything,
    compute_model,
    default_chunk_bytes,
    frame_bytes,
    with_options,
)


@pytest.mark.parametrize("implementation, runs", [("xla", ["xla"]), ("cudnn", ["cudnn", "xla"])])
def test_attention_implementations_agree(implementation, runs, monkeypatch):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 37, 4, 16))
    expected = attention(q, k, v, "einsum")
    tried, fused = [], jax.nn.dot_product_attention

    def recorded(*args, implementation, **kwargs):
        tried.append(implementation)
        return fused(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    # cuDNN cannot run on CPU (nor on float32 inputs): "cudnn" tries it, then falls back to XLA's.
    np.testing.assert_allclose(attention(q, k, v, implementation), expected, rtol=1e-5, atol=1e-6)
    assert tried == runs
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention(q, k, v, "flash")


def test_defaults_follow_the_platform():
    cpu, h100, v5e = Platform("cpu"), Platform("cuda", 80 * GIB), Platform("tpu", 16 * GIB)
    unknown_gpu = Platform("rocm")
    assert [default_attention(p) for p in (cpu, h100, v5e, unknown_gpu)] == ["einsum", "cudnn", "xla", "xla"]
    assert [precision.default_precision(p) for p in (cpu, h100, v5e)] == ["fp32", "bf16", "bf16"]
    # A 40th of a device's memory per chunk of frames; what stays in a last-level cache on CPU.
    assert [default_chunk_bytes(p) for p in (cpu, h100, v5e, unknown_gpu)] == [12 * MIB, 2 * GIB, 16 * GIB // 40,
                                                                                 2 * GIB]
    assert chunk_frames(100, 0) == 1 and chunk_frames(100, 1000) == 10


def test_each_per_frame_part_gets_its_own_chunk():
    # vits at 112x196: the encoder's frame (~3 MiB) is a sixth of the head's (~18 MiB).
    def chunks(chunk_bytes):
        model = nnx.eval_shape(lambda: VideoDepthAnything(model_config("vits"), chunk_bytes=chunk_bytes))
        return model.frames_per_chunk((112, 196))

    encoder, head = frame_bytes(model_config("vits"), (112, 196), jnp.float32)
    assert chunks(12 * MIB) == FrameChunks(4, 1)
    assert 4 * encoder <= 12 * MIB < 5 * encoder and head > 12 * MIB
    assert chunks(0) == FrameChunks(1, 1) and chunks(64 * MIB) == FrameChunks(22, 3)


@pytest.mark.parametrize("options", [dict(chunk_bytes=5 * MIB, matmul_precision=None),
                                     dict(dtype=jnp.bfloat16, attention="xla", chunk_bytes=MIB)])
def test_with_options_matches_a_model_built_with_them(tiny_model, options):
    changed = with_options(tiny_model, **options)
    built = nnx.eval_shape(lambda: VideoDepthAnything(tiny_model.config, **options))
    assert nnx.graphdef(changed) == nnx.graphdef(built)
    assert nnx.graphdef(tiny_model) == nnx.graphdef(nnx.eval_shape(lambda: VideoDepthAnything(tiny_model.config)))
    shared = jax.tree.leaves(nnx.state(changed)), jax.tree.leaves(nnx.state(tiny_model))
    assert all(a is b for a, b in zip(*shared, strict=True))  # the parameters, not copies


def test_platform_of_devices(tiny_model):
    assert Platform.of() == Platform.of(jax.devices()[:1]) == Platform("cpu")
    model = compute_model(tiny_model, devices=jax.devices()[:2])
    assert (model.encoder.dtype, model.attention, model.chunk_bytes) == (jnp.float32, "einsum", 12 * MIB)


def test_fp32_matmuls_run_at_highest_precision():
    x = jnp.ones((4, 4))

    def matmul(name):
        with jax.default_matmul_precision("default"):  # what a GPU run would otherwise get
            with jax.default_matmul_precision(precision.matmul_precision(name)):
                return jax.jit(lambda a: a @ a).lower(x).as_text()

    assert "[HIGHEST, HIGHEST]" in matmul("fp32") and "[HIGH, HIGH]" in matmul("tf32")
    assert precision.compute_dtype("bf16") == jnp.bfloat16 and precision.matmul_precision("bf16") is None
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose one of \['fp32', 'tf32', 'bf16'\]"):
        precision.compute_dtype("fp16")


def test_sharded_map_frames_is_device_major():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.arange(8 * 6 * 3, dtype=jnp.float32).reshape(48, 3), sharding)

    def fn(a):
        return jnp.tanh(a) * a.sum(axis=-1, keepdims=True)

    for chunk in (1, 4):  # 4 leaves a padded last chunk (6 frames per device)
        run = jax.jit(lambda a, c=chunk: map_frames(fn, a, c, sharding))
        np.testing.assert_allclose(run(x), fn(x), rtol=1e-6)
        assert "all-gather" not in run.lower(x).compile().as_text()
    # Without the sharding, the loop gathers frames from other devices.
    assert "all-gather" in jax.jit(lambda a: map_frames(fn, a, 1)).lower(x).compile().as_text()


def test_model_at_fp32_runs_every_matmul_at_highest(tiny_model):
    model = compute_model(tiny_model, "fp32")
    graphdef, params = nnx.split(model)
    frames = jnp.zeros((1, 28, 28, 3))
    with jax.default_matmul_precision("default"):  # a GPU's default: TF32
        text = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x)).lower(params, frames).as_text()
    assert "[HIGHEST, HIGHEST]" in text and "DEFAULT" not in text
