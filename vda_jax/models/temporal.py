"""Temporal attention layers of the spatio-temporal head.

Each layer lets every spatial position attend over the frames of its own clip:
GroupNorm -> Linear -> 2 x (LayerNorm, temporal self-attention, residual) ->
(LayerNorm, GEGLU feed-forward, residual) -> Linear, plus a residual around the
whole layer. Hidden states are laid out ``[B, T, S, D]`` (S = spatial positions).

For streaming, each attention sub-block is given ``()`` at a stream's first
frames, and returns their keys and values (``[B, T, S, D]`` each, projected but
without position encoding) to seed a cache; a later frame is given a ``Ring``:
past frames' keys and values in the slots of a fixed ring, the slot its own go
to and the slots to attend over. It writes its keys and values first and then
reads its context from the updated ring, so the ring is updated in place (no
copy of it for the reads) and the new frame needs no concatenation; it returns
the updated ring. Only the new frame is projected and queried; a clip
(``cached=None``) returns nothing and projects nothing for a cache. Both
encodings commute with the cache: RoPE rotates keys after projection, and the
projections have no bias, so ``to_k(x + pe) = to_k(x) + to_k(pe)`` for APE.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vda_jax.models.layers import Buffer, Dtype, FusedLinear, gelu, layer_norm, linear
from vda_jax.models.partitioning import constrain

_GROUP_NORM_EPS = 1e-6
_LAYER_NORM_EPS = 1e-5
_NUM_GROUPS = 32
_FF_MULT = 4


class Ring(NamedTuple):
    """A stream's past keys and values for a frame that follows them.

    arrays: per attention sub-block its keys and values (``k_0, v_0, k_1, v_1, ...``), ``[B, R, S, D]``
      each, a frame per slot (R slots), without position encoding.
    write: int32 scalar, the slot the new frame's keys and values go to (written before the reads).
    read: int32 ``[L]``, the slots of the frames attended over, in position order ``0 .. L-1``:
      the past frames', then ``write``.
    """

    arrays: tuple[jax.Array, ...]
    write: jax.Array
    read: jax.Array


Cache = tuple[jax.Array, ...] | Ring  # (): a stream's first frame; a tuple of keys and values: what it leaves


def cache_part(cache: Cache | None, start: int, stop: int) -> Cache | None:
    """The arrays ``start:stop`` of a cache (of a ``Ring``: the same slots), e.g. one layer's."""
    if isinstance(cache, Ring):
        return cache._replace(arrays=cache.arrays[start:stop])
    return None if cache is None else cache[start:stop]


def write_and_read(ring: jax.Array, new: jax.Array, write: jax.Array, read: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stores ``new`` (``[B, 1, ...]``) in slot ``write`` of ``ring`` (``[B, R, ...]``), then reads the
    slots ``read`` (``[L]``) of the result: the updated ring and ``[B, L, ...]``."""
    ring = jax.lax.dynamic_update_slice_in_dim(ring, new.astype(ring.dtype), write, axis=1)
    return ring, jnp.take(ring, read, axis=1)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """Absolute sinusoidal position encodings ``[length, dim]``: sin on even, cos on odd channels."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div)
    return table


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary encoding over the whole channel axis (pairs ``(2i, 2i+1)``), as the official ``rope``.

    Args:
      x: ``[B, T, S, D]``; positions: ``[T]`` integer frame positions.
    """
    dim = x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim)
    angle = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def attend_over_time(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Softmax attention along time per spatial position: q ``[B, T, S, D]``, k and v
    ``[B, U, S, D]`` -> ``[B, T, S, D]``, ``heads`` heads, scale ``(D / heads) ** -0.5``.

    The heads are moved in front of time first, so both matmuls are plain batched ones
    (the batch leading): XLA compiles those ~3x faster than the strided 5-d contractions.
    """
    b, t, s, d = q.shape
    by_head = lambda a: jnp.transpose(a.reshape(b, a.shape[1], s, heads, d // heads), (0, 2, 3, 1, 4))  # noqa: E731
    logits = jnp.einsum("bshtc,bshuc->bshtu", by_head(q), by_head(k), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (d // heads) ** -0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("bshtu,bshuc->bshtc", probs, by_head(v))
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, s, d)


def _by_position(x: jax.Array) -> jax.Array:
    """``[B*T, S, D]`` from the per-frame layout to the temporal layers' (whole clips, or spatial
    positions when a clip's frames are split over devices: then one all-to-all)."""
    return constrain(constrain(x, ("frames", None, None)), ("clips", "space", None))


def _by_frame(x: jax.Array) -> jax.Array:
    """The inverse of ``_by_position``."""
    return constrain(constrain(x, ("clips", "space", None)), ("frames", None, None))


class TemporalAttention(nnx.Module):
    """Self-attention along time, per spatial position; no q/k/v bias."""

    def __init__(self, dim: int, heads: int, max_frames: int, pe: str, *, rngs: nnx.Rngs, dtype: Dtype):
        self.heads = heads
        self.pe_type = pe
        self.to_q = linear(dim, dim, use_bias=False, axes=(None, "heads"), rngs=rngs, dtype=dtype)
        self.to_k = linear(dim, dim, use_bias=False, axes=(None, "heads"), rngs=rngs, dtype=dtype)
        self.to_v = linear(dim, dim, use_bias=False, axes=(None, "heads"), rngs=rngs, dtype=dtype)
        self.to_out = linear(dim, dim, axes=("heads", None), rngs=rngs, dtype=dtype)
        self.pe = Buffer(jnp.asarray(sinusoidal_table(max_frames, dim))) if pe == "ape" else None

    def __call__(self, x: jax.Array, cached: Ring | tuple[()] | None = None) -> tuple[jax.Array, Cache]:
        """Attends along time.

        Args:
          x: ``[B, T, S, D]`` normed hidden states of the frames to query.
          cached: None for a clip; for a stream, ``()`` at its first frames, or the ``Ring`` of
            past frames' keys and values (two arrays) for one new frame (T = 1).
        Returns:
          ``[B, T, S, D]`` and, for a stream, the (keys, values) of ``x``'s frames, ``[B, T, S, D]``
          each, at its first frames, or the updated ring's two arrays (a clip: ``()``).
        """
        ring = isinstance(cached, Ring)
        if cached and not ring:
            raise TypeError("a stream's later frames take past keys and values as a temporal.Ring")
        length = cached.read.shape[0] if ring else x.shape[1]
        num_cached = length - x.shape[1]
        pe = self._position_table(length, x.dtype)
        if not ring and pe is not None:  # a clip, or a stream's first frames: project the encoded inputs
            frames = x + pe[:, None, :]
            q, k, v = self.to_q(frames), self.to_k(frames), self.to_v(frames)
            new = () if cached is None else (self.to_k(x), self.to_v(x))
        else:
            q = self.to_q(x if pe is None else x + pe[num_cached:, None, :])
            k, v = self.to_k(x), self.to_v(x)
            new = () if cached is None else (k, v)
            if ring:
                keys, k = write_and_read(cached.arrays[0], k, cached.write, cached.read)
                values, v = write_and_read(cached.arrays[1], v, cached.write, cached.read)
                k, v, new = k.astype(x.dtype), v.astype(x.dtype), (keys, values)
            if pe is not None:  # no bias: to_k(x + pe) = to_k(x) + to_k(pe)
                k = k + self.to_k(pe)[:, None, :]
                v = v + self.to_v(pe)[:, None, :]
        if self.pe_type == "rope":
            q = apply_rope(q, jnp.arange(num_cached, length))
            k = apply_rope(k, jnp.arange(length))
        return self.to_out(attend_over_time(q, k, v, self.heads)), new

    def _position_table(self, length: int, dtype: Dtype) -> jax.Array | None:
        """The APE rows of positions ``0 .. length-1``, ``[length, D]``; None for RoPE."""
        if self.pe is None:
            return None
        if length > self.pe[...].shape[0]:
            raise ValueError(f"{length} frames exceed the temporal position encoding's "
                             f"{self.pe[...].shape[0]}; use shorter clips")
        return self.pe[...][:length].astype(dtype)


class GEGLUFeedForward(nnx.Module):
    """``value * gelu(gate)`` with both halves from one projection, then a projection back."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.proj = FusedLinear(dim, 2, _FF_MULT * dim, out_axis="mlp", rngs=rngs, dtype=dtype)
        self.out = linear(_FF_MULT * dim, dim, axes=("mlp", None), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        both = self.proj(x)
        return self.out(both[..., 0, :] * gelu(both[..., 1, :]))


class TemporalModule(nnx.Module):
    """One temporal layer of the head (a single transformer block of two attention sub-blocks)."""

    num_attention_blocks = 2
    cache_arrays = 2 * num_attention_blocks  # keys and values per attention sub-block

    def __init__(self, channels: int, heads: int, max_frames: int, pe: str, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32):
        dim = heads * (channels // heads)
        self.norm = nnx.GroupNorm(channels, num_groups=_NUM_GROUPS, epsilon=_GROUP_NORM_EPS,
                                  use_fast_variance=False, dtype=dtype, rngs=rngs)
        self.proj_in = linear(channels, dim, rngs=rngs, dtype=dtype)
        self.norms = nnx.List([layer_norm(dim, _LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
                               for _ in range(self.num_attention_blocks)])
        self.attention_blocks = nnx.List([TemporalAttention(dim, heads, max_frames, pe, rngs=rngs, dtype=dtype)
                                          for _ in range(self.num_attention_blocks)])
        self.ff_norm = layer_norm(dim, _LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.ff = GEGLUFeedForward(dim, rngs=rngs, dtype=dtype)
        # Zero-initialised output projection: a new layer starts as the identity.
        self.proj_out = linear(dim, channels, kernel_init=nnx.initializers.zeros, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        """Applies the layer.

        Args:
          x: ``[B, T, H, W, C]`` feature maps of a clip (or of the new frames when streaming).
          cache: None for a clip; for a stream, ``()`` at its first frames, or the ``Ring`` of past
            frames' keys and values per attention sub-block (``k_0, v_0, k_1, v_1``,
            ``[B, R, H*W, D]`` each) for one new frame.
        Returns:
          ``[B, T, H, W, C]`` and, for a stream, the new frames' keys and values in the same
          order (``[B, T, H*W, D]`` each) at its first frames, or the updated ring's arrays (a
          clip: ``()``).
        """
        b, t, h, w, c = x.shape
        hidden = self.norm(x.reshape(b * t, h, w, c)).reshape(b * t, h * w, c)
        hidden = self.proj_in(_by_position(hidden).reshape(b, t, h * w, c))
        new_cache = []
        for i, (norm, attention) in enumerate(zip(self.norms, self.attention_blocks)):
            out, keys_values = attention(norm(hidden), cache_part(cache, 2 * i, 2 * i + 2))
            hidden = hidden + out
            new_cache.extend(keys_values)
        hidden = hidden + self.ff(self.ff_norm(hidden))
        out = _by_frame(self.proj_out(hidden).reshape(b * t, h * w, c))
        return x + out.reshape(x.shape).astype(x.dtype), tuple(new_cache)
