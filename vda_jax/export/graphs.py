"""The two functions an export traces, with the model's parameters baked in as constants.

* ``clip``: ``frames`` float32 ``[B, T, h, w, 3]`` (ImageNet-normalised RGB at the
  network size) -> ``depth`` float32 ``[B, T, h, w]``; B is dynamic, T and (h, w) fixed.
* ``stream``: one frame with the temporal caches as explicit inputs and outputs,
  ``(frame [1, h, w, 3], step int32 [], ring_0..ring_15 [1, 43, S, D]) ->
  (depth [1, h, w], next_step int32 [], next_ring_0..next_ring_15)``, the rings
  holding past frames' keys and values (per temporal layer ``k_0, v_0, k_1, v_1``,
  without position encoding; the graph projects only the new frame). Feed the
  outputs back as the next frame's inputs; start with ``step = 0`` (the ring's
  contents are then ignored and seeded with the first frame). The ring and its
  bookkeeping are those of ``vda_jax.inference.stream``, so a runtime needs no
  Python to stream.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vda_jax.inference import stream
from vda_jax.models.vda import VideoDepthAnything


def clip_function(model: VideoDepthAnything) -> Callable[[jax.Array], jax.Array]:
    """``frames [B, T, h, w, 3] -> depth [B, T, h, w]`` (all frames at once: no ``lax.map``)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda frames: nnx.merge(graphdef, params)(frames, frames_per_chunk=None).astype(jnp.float32))


def stream_function(model: VideoDepthAnything, net_size: tuple[int, int]) -> Callable[..., tuple[jax.Array, ...]]:
    """``(frame, step, *ring) -> (depth, step + 1, *ring)``, the first frame (step 0) seeding the ring."""
    graphdef, params = nnx.split(model)

    def step_fn(frame: jax.Array, step: jax.Array, *ring: jax.Array) -> tuple[jax.Array, ...]:
        model = nnx.merge(graphdef, params)
        state, depth = stream.decode_next(model, model.encode(frame), stream.StreamState(ring, step), net_size)
        return depth[:, 0].astype(jnp.float32), state.step, *state.ring

    return jax.jit(step_fn)


def stream_specs(model: VideoDepthAnything, net_size: tuple[int, int]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The streaming function's inputs: frame, step, then the ring."""
    state = stream.state_shapes(model, net_size)
    return (jax.ShapeDtypeStruct((1, *net_size, 3), jnp.float32), state.step, *state.ring)
