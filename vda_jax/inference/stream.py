"""Streaming inference: one frame in, its depth out, as the official streaming mode.

Each new frame attends, in every temporal layer, over 31 past frames: frame 0,
the frame ``KEY_GAP`` = 41 back, and the last 29; while there is not enough
history, frame 0 stands in for the missing frames (the official mode seeds its
cache with 32 copies of frame 0). Frame ``k`` thus sees frames
``[0, max(k - 41, 0), max(k - 29, 0), ..., max(k - 1, 0)]``, in that order
(positions 0..30 of the temporal position encoding; the new frame is 31).

What a frame leaves for later frames is, per attention sub-block of each temporal
layer, its keys and values: projected once, when the frame is new, and stored
without position encoding, since a frame's position in the context changes from
step to step (the attention encodes positions 0..31 as it reads; see
``TemporalAttention``), so a step projects only the new frame. They live on
the device in a fixed ring of ``RING_SLOTS`` = 43 frames, 16 arrays
``[1, RING_SLOTS, S, D]`` (``StreamState``): slot 0 keeps frame 0, frame
``f >= 1`` goes to slot ``1 + (f - 1) % 42``. Each attention writes its new
frame first, into the slot of frame ``k - 42``, which neither it nor a later
frame reads, and then reads its 32 frames (``read_slots``) from the updated ring:
so the ring is updated in place (a read before the write would make XLA copy
the ring twice a step, 140 MB at 540p). The slots follow from a step counter
carried on the device, so one program serves every frame of a frame size (the
first, computed alone as the official does, seeds the ring: a branch on the
counter) and never retraces; the ring is donated from step to step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vda_jax import compilation_cache
from vda_jax.inference import window
from vda_jax.inference.preprocess import network_size, preprocess
from vda_jax.models.temporal import Cache, Ring
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.ops.resize import resize_bilinear_align_corners
from vda_jax.xla_options import compiler_options

CONTEXT_FRAMES = window.WINDOW_FRAMES - 1  # 31 past frames per new frame
RECENT_FRAMES = CONTEXT_FRAMES - 2  # 29: all but frame 0 and the key frame
# The official constant: two window strides, less one, less the 2 aligned key frames.
KEY_GAP = 2 * window.STRIDE - 1 - window.ALIGN_FRAMES  # 41
RING_SLOTS = 2 + KEY_GAP  # frame 0, the 41 frames a step may read, and the new one


class StreamState(NamedTuple):
    """What a stream carries from one frame to the next.

    ring: 16 arrays ``[1, RING_SLOTS, S, D]``, per temporal layer (4) the keys and values of its
      two attention sub-blocks (``k_0, v_0, k_1, v_1``), per frame, without position encoding.
    step: int32 scalar, the index of the next frame.
    """

    ring: Cache
    step: jax.Array


def context_frames(step: jax.Array) -> jax.Array:
    """Indices of the past frames frame ``step`` (>= 1) attends over, in order: int32 ``[31]``."""
    step = jnp.asarray(step, jnp.int32)
    key = jnp.maximum(step - KEY_GAP, 0)
    recent = jnp.maximum(step - jnp.arange(RECENT_FRAMES, 0, -1, dtype=jnp.int32), 0)
    return jnp.concatenate([jnp.zeros(1, jnp.int32), key[None], recent])


def ring_slot(frame: jax.Array) -> jax.Array:
    """The ring slot holding frame ``frame``'s keys and values."""
    return jnp.where(frame == 0, 0, 1 + (frame - 1) % (RING_SLOTS - 1)).astype(jnp.int32)


def read_slots(step: jax.Array) -> jax.Array:
    """The slots frame ``step`` (>= 1) reads, in position order: its 31 past frames', then its own: int32 ``[32]``."""
    step = jnp.asarray(step, jnp.int32)
    return ring_slot(jnp.concatenate([context_frames(step), step[None]]))


def state_shapes(model: VideoDepthAnything, net_size: tuple[int, int]) -> StreamState:
    """The shapes and dtypes of a stream's state at ``net_size`` (``jax.ShapeDtypeStruct`` leaves).

    Works on a model with abstract parameters too (only the head is traced, on the encoder's
    output shapes).
    """
    config, (graphdef, params) = model.config, nnx.split(model)
    grid = (1, net_size[0] // config.patch_size, net_size[1] // config.patch_size, config.embed_dim)
    features = tuple(jax.ShapeDtypeStruct(grid, model.encoder.dtype) for _ in config.intermediate_layers)
    states = jax.eval_shape(lambda p, f: nnx.merge(graphdef, p).decode(f, 1, net_size, ())[1], params, features)
    ring = tuple(jax.ShapeDtypeStruct((1, RING_SLOTS, *s.shape[2:]), s.dtype) for s in states)
    return StreamState(ring, jax.ShapeDtypeStruct((), jnp.int32))


def decode_next(model: VideoDepthAnything, features: tuple[jax.Array, ...], state: StreamState,
                net_size: tuple[int, int]) -> tuple[StreamState, jax.Array]:
    """The head on the stream's next frame: its four ``[1, ph, pw, E]`` encoder outputs -> the new
    state and its depth ``[1, 1, h, w]`` at the network size.

    The first frame (``state.step == 0``; the ring's contents are ignored) is computed alone, as
    the official stream does, and its keys and values fill every ring slot; a later frame's go
    to its slot, and it attends over ``read_slots``.
    """

    def first(ring: Cache) -> tuple[jax.Array, Cache]:
        depth, states = model.decode(features, 1, net_size, ())
        return depth, tuple(jnp.broadcast_to(s.astype(r.dtype), r.shape) for s, r in zip(states, ring))

    def later(ring: Cache) -> tuple[jax.Array, Cache]:
        return model.decode(features, 1, net_size, Ring(ring, ring_slot(state.step), read_slots(state.step)))

    depth, ring = jax.lax.cond(state.step == 0, first, later, state.ring)
    return StreamState(ring, state.step + 1), depth


def stream_step(model: VideoDepthAnything, state: StreamState, frame: jax.Array,
                net_size: tuple[int, int]) -> tuple[StreamState, jax.Array]:
    """Depth of the stream's next frame (uint8 ``[H, W, 3]`` -> float32 ``[H, W]``) and the new state
    (``decode_next``; a stream starts from zeros of ``state_shapes``)."""
    features = model.encode(preprocess(frame[None], net_size))
    state, depth = decode_next(model, features, state, net_size)
    return state, resize_bilinear_align_corners(depth[0, 0].astype(jnp.float32), frame.shape[:2], axes=(0, 1))


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, net_size: tuple[int, int]):
    """The jitted ``stream_step`` for one model graph and network size (frame sizes key their own traces)."""
    compilation_cache.enable()

    def step(params, state, frame):
        return stream_step(nnx.merge(graphdef, params), state, frame, net_size)

    return jax.jit(step, donate_argnums=1, compiler_options=compiler_options())


class StreamingDepth:
    """Depth of a live video, one frame at a time, as the official ``infer_video_depth_one``.

    The first frame fixes the frame size and the network input size (the official
    aspect and multiple-of-14 rule); later frames must share that size until
    ``reset()``. Each depth depends only on the frames before it.
    """

    def __init__(self, model: VideoDepthAnything, input_size: int = 518, precision: str | None = None):
        self._graphdef, self._params = nnx.split(compute_model(model, precision, devices=jax.devices()[:1]))
        self.input_size = input_size
        self.reset()

    def reset(self) -> None:
        """Forgets the stream: the next frame starts a new one (of any size)."""
        self.frame_size: tuple[int, int] | None = None
        self._state: StreamState | None = None
        self._step = None

    def step(self, frame: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` -> float32 depth ``[H, W]`` (relative: larger is nearer; metric: metres)."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB [H, W, 3], got {frame.dtype} {frame.shape}")
        if self._state is None:
            net_size = network_size(frame.shape[:2], self.input_size)
            self._step = _compiled(self._graphdef, net_size)
            shapes = state_shapes(nnx.merge(self._graphdef, self._params), net_size)
            # Placed like the step's outputs (committed to the device), so the first frame's call
            # hits the same compiled program as the later ones.
            self._state = jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), jax.devices()[0])
            self.frame_size = frame.shape[:2]
        elif frame.shape[:2] != self.frame_size:
            raise ValueError(f"frame is {frame.shape[0]}x{frame.shape[1]} but the stream started at "
                             f"{self.frame_size[0]}x{self.frame_size[1]}; resize it or call reset() first")
        self._state, depth = self._step(self._params, self._state, frame)
        return np.asarray(depth)


def stream_depth(model: VideoDepthAnything, frames: Iterable[np.ndarray], *, input_size: int = 518,
                 precision: str | None = None) -> Iterator[np.ndarray]:
    """Yields each frame's depth (float32 ``[H, W]``) as soon as the frame arrives, e.g. from a camera."""
    stream = StreamingDepth(model, input_size, precision)
    for frame in frames:
        yield stream.step(frame)
