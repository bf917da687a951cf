"""The sliding-window step of the long-video inference.

Windows of 32 frames start every 22 frames. From the second window on, the
first 10 inputs are the previous window's inputs at ``KEYFRAMES``; since the
encoder is per-frame, their features are carried over instead of recomputed,
so each step encodes only its 22 new frames (a video's first window all of its
32), and past a video's end only its real frames: the official padding repeats
the last frame, whose features are copied. The head then runs on all 32. The
step is two functions, ``encode_window`` and ``decode_window``, compiled as two
programs (``video.WindowPrograms``) that serve every window of every video of a
frame size.

Relative models are aligned window to window: a least-squares scale and shift
maps the window's depths of its first two inputs (video frame 0 and the
previous window's frame at index 12) onto their reference depths, the 8
overlapping frames are blended linearly with the previous window's, and the
reference of the second key frame moves to this window's frame at index 12.
Metric models skip the fit (scale 1, shift 0) but blend the same way.

Each step returns, per video slot, the window's 32 depths at the frame size:
inputs 2..23 became final (2..9 blended with the previous window), inputs 0 and
1 are final only in a video's first window, and inputs 24..31 wait for the next
window's blend (final only in its last window). The carried depths stay at the
network's resolution, so the step writes each frame-size depth once.
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

    Depths are carried at the network's resolution ``h x w``, with the scale and shift that
    aligned them: their frame-size versions are upsampled again where a step reads them, so
    a step writes each frame-size depth once, as an output.

    key_features: four ``[B, 10, ph, pw, E]`` encoder outputs of the next window's first inputs.
    anchor: ``[B, h, w]`` depth of the video's frame 0 (kept as it is: the reference of every
      window's first input).
    previous: ``[B, 9, h, w]`` the last window's depths of its input 12 (the reference of the
      next window's second input) and of its last 8 inputs (the overlap to blend).
    affine: ``[B, 2]`` the scale and shift that aligned ``previous``.
    """

    key_features: tuple[jax.Array, ...]
    anchor: jax.Array
    previous: jax.Array
    affine: jax.Array


_PREVIOUS = np.asarray((KEYFRAMES[1], *range(FINAL_END, WINDOW_FRAMES)))  # the window inputs ``previous`` keeps


def aligned_depth(depth: jax.Array, affine: jax.Array, frame_size: tuple[int, int]) -> jax.Array:
    """Network-size depths ``[n, h, w]`` at ``frame_size``, scaled, shifted and clipped at 0: ``[n, H, W]``.

    ``affine``: ``[2]`` (one scale and shift for all) or ``[n, 2]``.
    """
    up = resize_bilinear_align_corners(depth, frame_size, axes=(-2, -1))
    affine = jnp.broadcast_to(affine, (depth.shape[0], 2))
    return jnp.maximum(up * affine[:, 0, None, None] + affine[:, 1, None, None], 0.0)


def align_window(depth: jax.Array, anchor: jax.Array, previous: jax.Array, affine: jax.Array, first: jax.Array,
                 frame_size: tuple[int, int], metric: bool) -> tuple[jax.Array, jax.Array]:
    """Aligns one window to the previous one and blends the overlap, at the frame size.

    The first window is kept as it is (scale 1, shift 0: the clip at 0 changes nothing, the
    depths being non-negative).

    Args:
      depth: ``[32, h, w]`` this window's depths at the network's resolution.
      anchor, previous, affine: the slot's ``WindowState`` (ignored when ``first``).
      first: scalar bool, the video's first window.
      frame_size: (H, W).
      metric: skip the scale/shift fit.
    Returns:
      The window's aligned depths ``[32, H, W]``, its inputs 2..9 blended with the previous
      window's (the layout of ``decode_window``'s output), and its scale and shift ``[2]``.
    """
    identity = jnp.array([1.0, 0.0], jnp.float32)
    if metric:
        fitted = identity
    else:
        reference = aligned_depth(jnp.stack([anchor, previous[0]]), jnp.stack([identity, affine]), frame_size)
        keys = aligned_depth(depth[:ALIGN_FRAMES], identity, frame_size)
        fitted = jnp.stack(scale_and_shift(keys, reference, jnp.ones_like(reference)))
    fitted = jnp.where(first, identity, fitted)
    aligned = aligned_depth(depth, fitted, frame_size)
    overlap = aligned[ALIGN_FRAMES:OVERLAP_FRAMES]
    w = jnp.asarray(blend_weights())[:, None, None]
    blended = jnp.where(first, overlap, aligned_depth(previous[1:], affine, frame_size) * (1.0 - w) + overlap * w)
    return jnp.concatenate([aligned[:ALIGN_FRAMES], blended, aligned[OVERLAP_FRAMES:]]), fitted


def empty_state(model: VideoDepthAnything, slots: int, net_size: tuple[int, int],
                frame_size: tuple[int, int]) -> WindowState:
    """Host zeros of the right shapes for ``slots`` videos (a slot's first window ignores them).

    ``frame_size`` is not part of the state (depths are carried at ``net_size``).
    """
    config = model.config
    grid = (net_size[0] // config.patch_size, net_size[1] // config.patch_size, config.embed_dim)
    key_features = tuple(np.zeros((slots, OVERLAP_FRAMES, *grid), model.encoder.dtype)
                         for _ in config.intermediate_layers)
    return WindowState(key_features, np.zeros((slots, *net_size), np.float32),
                       np.zeros((slots, len(_PREVIOUS), *net_size), np.float32), np.zeros((slots, 2), np.float32))


def real_positions(real: jax.Array) -> jax.Array:
    """Which window inputs are frames of the video (the rest pad it): bool ``[B, 32]``."""
    return jnp.arange(WINDOW_FRAMES) < real[:, None]


def encoded_positions(first: jax.Array, real: jax.Array) -> jax.Array:
    """Which window inputs a step encodes: bool ``[B, 32]``.

    A slot's first window encodes its real inputs; a later one only its real new ones
    (from index 10 on: the first 10 are the previous window's, carried as features).
    """
    return real_positions(real) & (first[:, None] | (jnp.arange(WINDOW_FRAMES) >= OVERLAP_FRAMES))


def encode_window(model: VideoDepthAnything, frames: jax.Array, first: jax.Array, real: jax.Array,
                  net_size: tuple[int, int]) -> tuple[jax.Array, ...]:
    """The first half of a window step for every slot: the encoder features of its new inputs.

    Args:
      frames: uint8 ``[B, 32, H, W, 3]``, each slot's window inputs; when the slot continues
        a video the first 10 are not read (their features come from the ``WindowState``).
      first: bool ``[B]``, the slot's first window.
      real: int32 ``[B]``, how many inputs are frames of the video (0: an idle slot). The
        rest repeat the last one (the official padding), so they are not encoded: the
        encoder is per-frame and their features are copies of the last frame's.
      net_size: network input (h, w), multiples of 14.
    Returns:
      Four ``[B, 32, ph, pw, E]`` encoder outputs in the carried features' dtype; those of the
      inputs not encoded (``encoded_positions``) are undefined.
    """
    b, t, height, width, _ = frames.shape
    encoded = model.encode(frames.reshape(b * t, height, width, 3), model.frames_per_chunk(net_size).encoder,
                           active=encoded_positions(first, real).reshape(-1),
                           prepare=lambda x: preprocess(x, net_size))
    return tuple(f.reshape(b, t, *f.shape[1:]).astype(model.encoder.dtype) for f in encoded)


def decode_window(model: VideoDepthAnything, state: WindowState, encoded: tuple[jax.Array, ...], first: jax.Array,
                  real: jax.Array, frame_size: tuple[int, int],
                  net_size: tuple[int, int]) -> tuple[WindowState, jax.Array]:
    """The second half of a window step for every slot: the head and the alignment.

    Args:
      state: carried from the previous window (a slot's first window ignores it).
      encoded: ``encode_window``'s output for the window.
      first, real, net_size: as ``encode_window``'s. The head's temporal layers see the
        padding inputs (copies of the last frame's features); its per-frame end skips them
        (depth 0: the frames past a video's end are never output).
      frame_size: (H, W) of the frames.
    Returns:
      The new state and the windows' depths ``[B, 32, H, W]`` (see the module's docstring).
    """
    b, t = first.shape[0], WINDOW_FRAMES
    source = jnp.maximum(jnp.minimum(jnp.arange(t), real[:, None] - 1), 0)  # [B, 32]: the padding's copies

    def window_features(carried: jax.Array, new: jax.Array) -> jax.Array:
        head = jnp.where(first[:, None, None, None, None], new[:, :OVERLAP_FRAMES], carried)
        features = jnp.concatenate([head, new[:, OVERLAP_FRAMES:]], axis=1)
        return jax.vmap(lambda f, i: f[i])(features, source)

    features = tuple(window_features(k, f) for k, f in zip(state.key_features, encoded))
    depth, _ = model.decode(tuple(f.reshape(b * t, *f.shape[2:]) for f in features), WINDOW_FRAMES, net_size,
                            frames_per_chunk=model.frames_per_chunk(net_size).head,
                            active=real_positions(real).reshape(-1))
    align = jax.vmap(align_window, in_axes=(0, 0, 0, 0, 0, None, None))
    out, affine = align(depth, state.anchor, state.previous, state.affine, first, frame_size, model.config.metric)
    anchor = jnp.where(first[:, None, None], depth[:, 0], state.anchor)
    key_features = tuple(f[:, np.asarray(KEYFRAMES)] for f in features)
    return WindowState(key_features, anchor, depth[:, _PREVIOUS], affine), out

