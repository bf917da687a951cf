"""Small building blocks shared by the encoder and the head."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from vda_jax.devices import Platform
from vda_jax.models.partitioning import GatherAtUse, gather

Dtype = jnp.dtype | type


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the checkpoint (e.g. the temporal ``pe`` table)."""


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's ``nn.GELU()`` default."""
    return jax.nn.gelu(x, approximate=False)


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def default_attention(platform: Platform) -> str:
    """The attention implementation for a program's devices (``Platform.of``).

    CPU: two einsums (~25% faster there than ``jax.nn.dot_product_attention``'s XLA path);
    NVIDIA GPUs: cuDNN's fused flash attention (falling back to XLA where cuDNN cannot run it);
    elsewhere (TPUs, ROCm): XLA's.
    """
    return {"cpu": "einsum", "cuda": "cudnn"}.get(platform.kind, "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "einsum") -> jax.Array:
    """Softmax attention, ``[B, N, heads, D]`` layouts, scale ``D ** -0.5``.

    ``implementation``: "einsum" (two einsums, float32 softmax), "xla" or "cudnn"
    (``jax.nn.dot_product_attention``'s). "cudnn" is a fused kernel without the
    ``[B, heads, N, N]`` logits; where cuDNN cannot run it (no cuDNN, float32 inputs,
    unsupported shapes) it falls back to "xla", with the same result.
    """
    if implementation == "einsum":
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # cuDNN is missing or does not support these inputs
    elif implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {ATTENTION_IMPLEMENTATIONS}")
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def checkpointed(fn: Callable[..., Any], remat: bool) -> Callable[..., Any]:
    """``fn`` under ``jax.checkpoint`` when ``remat``: its activations are recomputed in the backward pass."""
    return jax.checkpoint(fn) if remat else fn


def map_frames(fn: Callable[[Any], Any], xs: Any, frames_per_chunk: int | None,
               sharding: NamedSharding | None = None, active: jax.Array | None = None) -> Any:
    """``fn(xs)`` for a per-frame ``fn``, run ``frames_per_chunk`` frames (per device) at a time.

    ``xs`` is a pytree of arrays sharing a leading frame axis, as is ``fn``'s output.
    Chunks bound the memory of the intermediates and, on CPU, keep them in cache
    (``vda.default_chunk_bytes``). None (or a chunk covering every frame) calls ``fn``
    once on all frames.

    ``sharding``: how the frame axis is split over devices (contiguous blocks, e.g.
    ``NamedSharding(mesh, P("data"))``), or None. The frames are then laid out
    device-major (``[N] -> [N / devices, devices]``) before the loop and every chunk
    takes its frames from all devices at once, so each device only ever touches its
    own frames: no collectives run in the loop.

    ``active``: bool ``[N]``, the frames whose outputs are used, or None (all). Chunks
    without an active frame are skipped and give zeros, so padding frames cost nothing
    when frames run in chunks; the outputs of active frames do not depend on it.
    """
    frames = jax.tree.leaves(xs)[0].shape[0]
    shards = 1 if sharding is None else _blocks(sharding)
    if frames_per_chunk is None or frames_per_chunk * shards >= frames:
        return fn(xs)
    if frames % shards:
        raise ValueError(f"{frames} frames do not split into {shards} shards")
    local = frames // shards
    chunk = min(frames_per_chunk, local)
    steps = -(-local // chunk)
    pad = steps * chunk - local  # each device's frames padded with copies of its last one

    def device_major(a: jax.Array) -> jax.Array:  # [N, ...] -> [steps, shards * chunk, ...]
        a = a.reshape(shards, local, *a.shape[1:])
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode="edge")
        a = jnp.swapaxes(a.reshape(shards, steps, chunk, *a.shape[2:]), 0, 1)
        return a.reshape(steps, shards * chunk, *a.shape[3:])

    def frame_major(a: jax.Array) -> jax.Array:  # the inverse
        a = jnp.swapaxes(a.reshape(steps, shards, chunk, *a.shape[2:]), 0, 1)
        return a.reshape(shards, steps * chunk, *a.shape[3:])[:, :local].reshape(frames, *a.shape[3:])

    constrain = (lambda a: a) if sharding is None else functools.partial(jax.lax.with_sharding_constraint,
                                                                         shardings=sharding)

    def step(x):  # x: frames [shards * chunk, ...], ``chunk`` from each device
        return jax.tree.map(constrain, fn(jax.tree.map(constrain, x)))

    chunks = jax.tree.map(device_major, xs)
    if active is None:
        return jax.tree.map(frame_major, jax.lax.map(step, chunks))
    # Whether each chunk runs is decided before the loop, so the loop holds no collectives.
    run = jnp.any(device_major(active), axis=1)
    skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(step, jax.tree.map(lambda a: a[0], chunks)))

    def maybe_step(args):
        x, run_chunk = args
        return jax.lax.cond(run_chunk, step, lambda x: skipped, x)

    return jax.tree.map(frame_major, jax.lax.map(maybe_step, (chunks, run)))


def _blocks(sharding: NamedSharding) -> int:
    """Blocks a ``NamedSharding`` splits the leading dimension into."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def chunk_frames(frame_bytes: int, chunk_bytes: int) -> int:
    """Frames per chunk so a chunk's intermediates stay within ``chunk_bytes`` (at least one frame).

    ``frame_bytes``: one frame's peak intermediate bytes; ``chunk_bytes`` 0 means one frame.
    """
    return max(1, chunk_bytes // max(frame_bytes, 1))


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
           use_bias: bool = True, kernel_init: nnx.Initializer | None = None,
           axes: tuple[str | None, str | None] = (None, None)) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` is gathered at use to the logical ``axes``."""
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs, **init,
                      promote_dtype=GatherAtUse(axes, axes[1:]))


class FusedLinear(nnx.Module):
    """``parts`` linear maps of one input in one matmul: ``[..., in] -> [..., parts, out]``.

    Kernel ``[in, parts, out]``, bias ``[parts, out]``. The parts (q, k, v; GEGLU's value
    and gate) are an axis of their own, so tensor parallelism splits ``out`` (the logical
    ``out_axis``, e.g. heads) and every shard holds matching slices of all parts.

    The product is a ``tensordot``: the same XLA dot as ``einsum("...i,ipo->...po")``, but
    jax2onnx exports that einsum by broadcasting the kernel to ``[..., in, parts, out]``
    (gigabytes per layer); a ``tensordot`` exports as one ONNX Einsum of the two operands.
    """

    def __init__(self, in_features: int, parts: int, out_features: int, *, out_axis: str,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))  # fan-in as an [in, parts*out] Linear
        self.kernel = nnx.Param(init(rngs.params(), (in_features, parts, out_features)))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (parts, out_features)))
        self.out_axis = out_axis
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = gather(self.kernel[...], (None, None, self.out_axis)).astype(self.dtype)
        bias = gather(self.bias[...], (None, self.out_axis)).astype(self.dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel, axes=1) + bias


def conv(in_features: int, out_features: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int = 0, use_bias: bool = True, dtype: Dtype = jnp.float32) -> nnx.Conv:
    """A PyTorch-style Conv2d on channels-last input: symmetric zero padding."""
    return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                    padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                    dtype=dtype, rngs=rngs, promote_dtype=GatherAtUse((None,) * 4))


def layer_norm(features: int, epsilon: float, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.LayerNorm:
    # Exact two-pass variance, like PyTorch (Flax defaults to the fast E[x^2] - E[x]^2).
    return nnx.LayerNorm(features, epsilon=epsilon, use_fast_variance=False, dtype=dtype, rngs=rngs)


class UpConv(nnx.Module):
    """Transposed convolution whose stride equals its kernel (no overlap, no padding).

    Each input pixel expands into its own ``k x k`` output patch, so the op is a
    matmul and a reshape: ``[N, H, W, Cin] -> [N, k*H, k*W, Cout]``. Kernel layout
    ``[k, k, Cin, Cout]``; PyTorch's ``ConvTranspose2d`` weight is ``[Cin, Cout, k, k]``.
    """

    def __init__(self, in_features: int, out_features: int, factor: int, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32):
        init = nnx.initializers.lecun_normal(in_axis=2, out_axis=(0, 1, 3))
        self.kernel = nnx.Param(init(rngs.params(), (factor, factor, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.factor = factor
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, _ = x.shape
        k = self.factor
        kernel = gather(self.kernel[...], (None,) * 4).astype(self.dtype)
        y = jnp.einsum("nhwc,klco->nhkwlo", x.astype(self.dtype), kernel)
        return y.reshape(n, h * k, w * k, -1) + gather(self.bias[...], (None,)).astype(self.dtype)
