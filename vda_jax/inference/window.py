"""The jitted sliding-window step of the long-video inference.

Windows of 32 frames start every 22 frames. From the second window on, the
first 10 inputs are the previous window's inputs at ``KEYFRAMES``; since the
encoder is per-frame, their features are carried over instead of recomputed,
so each step encodes only its 22 new frames (a video's first window all of its
32), and past a video's end only its real frames: the official padding repeats
the last frame, whose features are copied. The head then runs on all 32. One
compiled step serves every window of every video of a frame size.

Relative models are aligned window to window: a least-squares scale and shift
maps the window's depths of its first two inputs (video frame 0 and the
previous window's frame at index 12) onto their reference depths, the 8
overlapping frames are blended linearly with the previous window's, and the
reference of the second key frame moves to this window's frame at index 12.
Metric models skip the fit (scale 1, shift 0) but blend the same way.

Each step returns, per video slot, the 22 frames that became final, the first
two frames (final only in a video's first window) and the 8 frames that wait
for the next window's blend (final only in its last window).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vda_jax.inference.preprocess import preprocess
from vda_jax.inference.schedule import (  # noqa: F401 (re-exported: the schedule is part of this module's API)
    ALIGN_FRAMES,
    FINAL_END,
    INTERP_FRAMES,
    KEYFRAMES,
    OVERLAP_FRAMES,
    STRIDE,
    WINDOW_FRAMES,
    blend_weights,
    num_windows,
)
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.ops.align import scale_and_shift
from vda_jax.ops.resize import resize_bilinear_align_corners


class WindowState(NamedTuple):
    """What one video slot carries from a window to the next (leading axis: slots ``B``).

    key_features: four ``[B, 10, ph, pw, E]`` encoder outputs of the next window's first inputs.
    reference: ``[B, 2, H, W]`` depths the next window's first two frames are aligned to.
    pending: ``[B, 8, H, W]`` aligned depths of the overlap, awaiting the next window's blend.
    """

    key_features: tuple[jax.Array, ...]
    reference: jax.Array
    pending: jax.Array


class WindowOutput(NamedTuple):
    """Depths ``[B, n, H, W]`` a step hands back: ``final`` (22), ``head`` (2) and ``tail`` (8)."""

    final: jax.Array
    head: jax.Array
    tail: jax.Array


def align_window(depth: jax.Array, reference: jax.Array, pending: jax.Array, first: jax.Array,
                 metric: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Aligns one window to the previous one and blends the overlap.

    Args:
      depth: ``[32, H, W]`` this window's depths at frame resolution.
      reference: ``[2, H, W]``; pending: ``[8, H, W]`` (ignored when ``first``).
      first: scalar bool, the video's first window (kept as it is).
      metric: skip the scale/shift fit.
    Returns:
      ``(final [22, H, W], aligned [32, H, W], new reference [2, H, W], new pending [8, H, W])``.
    """
    if metric:
        scale, shift = jnp.float32(1.0), jnp.float32(0.0)
    else:
        scale, shift = scale_and_shift(depth[:ALIGN_FRAMES], reference, jnp.ones_like(reference))
    aligned = jnp.maximum(depth * scale + shift, 0.0)
    aligned = jnp.where(first, depth, aligned)
    overlap = aligned[ALIGN_FRAMES:OVERLAP_FRAMES]
    w = jnp.asarray(blend_weights())[:, None, None]
    blended = jnp.where(first, overlap, pending * (1.0 - w) + overlap * w)
    final = jnp.concatenate([blended, aligned[OVERLAP_FRAMES:FINAL_END]])
    reference = jnp.stack([jnp.where(first, aligned[0], reference[0]), aligned[KEYFRAMES[1]]])
    return final, aligned, reference, aligned[FINAL_END:]


def empty_state(model: VideoDepthAnything, slots: int, net_size: tuple[int, int],
                frame_size: tuple[int, int]) -> WindowState:
    """Host zeros of the right shapes for ``slots`` videos (a slot's first window ignores them)."""
    config, (height, width) = model.config, net_size
    grid = (height // config.patch_size, width // config.patch_size, config.embed_dim)
    key_features = tuple(np.zeros((slots, OVERLAP_FRAMES, *grid), model.encoder.dtype)
                         for _ in config.intermediate_layers)
    return WindowState(key_features, np.zeros((slots, ALIGN_FRAMES, *frame_size), np.float32),
                       np.zeros((slots, INTERP_FRAMES, *frame_size), np.float32))


def encoded_positions(first: jax.Array, real: jax.Array) -> jax.Array:
    """Which window inputs a step encodes: bool ``[B, 32]``.

    A slot's first window encodes its real inputs; a later one only its real new ones
    (from index 10 on: the first 10 are the previous window's, carried as features).
    """
    position = jnp.arange(WINDOW_FRAMES)
    return (position < real[:, None]) & (first[:, None] | (position >= OVERLAP_FRAMES))


def window_step(model: VideoDepthAnything, state: WindowState, frames: jax.Array, first: jax.Array,
                real: jax.Array, net_size: tuple[int, int]) -> tuple[WindowState, WindowOutput]:
    """One window for every slot.

    Args:
      state: carried from the previous window (a slot's first window ignores it).
      frames: uint8 ``[B, 32, H, W, 3]``, each slot's window inputs; when the slot continues
        a video the first 10 are not read (their features come from ``state``).
      first: bool ``[B]``, the slot's first window.
      real: int32 ``[B]``, how many inputs are frames of the video (0: an idle slot). The
        rest repeat the last one (the official padding), so they are not encoded: the
        encoder is per-frame and their features are copies of the last frame's.
      net_size: network input (h, w), multiples of 14.
    """
    b, t, height, width, _ = frames.shape
    encoded = model.encode(frames.reshape(b * t, height, width, 3), model.frames_per_chunk(net_size),
                           active=encoded_positions(first, real).reshape(-1),
                           prepare=lambda x: preprocess(x, net_size))
    source = jnp.maximum(jnp.minimum(jnp.arange(t), real[:, None] - 1), 0)  # [B, 32]: the padding's copies

    def window_features(carried: jax.Array, new: jax.Array) -> jax.Array:
        new = new.reshape(b, t, *new.shape[1:]).astype(carried.dtype)
        head = jnp.where(first[:, None, None, None, None], new[:, :OVERLAP_FRAMES], carried)
        features = jnp.concatenate([head, new[:, OVERLAP_FRAMES:]], axis=1)
        return jax.vmap(lambda f, i: f[i])(features, source)

    features = tuple(window_features(k, f) for k, f in zip(state.key_features, encoded))
    depth, _ = model.decode(tuple(f.reshape(b * t, *f.shape[2:]) for f in features),
                            WINDOW_FRAMES, net_size, frames_per_chunk=model.frames_per_chunk(net_size))
    depth = resize_bilinear_align_corners(depth, (height, width), axes=(-2, -1))
    align = jax.vmap(align_window, in_axes=(0, 0, 0, 0, None))
    final, aligned, reference, pending = align(depth, state.reference, state.pending, first, model.config.metric)
    key_features = tuple(f[:, np.asarray(KEYFRAMES)] for f in features)
    return WindowState(key_features, reference, pending), WindowOutput(final, aligned[:, :ALIGN_FRAMES], pending)
