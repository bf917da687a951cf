"""The long-video inference strategies compared in the paper's ablation (Table 5).

* ``no_overlap`` (the baseline): consecutive 32-frame windows, each inferred on its own. No
  frame is shared and nothing ties a window's scale and shift to its neighbours'.
* ``overlap_alignment`` (OA): windows start every 22 frames, so neighbours share 10 frames;
  each window is mapped onto the previous one by the least-squares scale and shift over those
  frames and contributes only its new frames (no interpolation, no key frames).
* ``full`` (OI + KR, the released method): ``infer_video_depth``.

Metric models skip the fit, as in the released inference. The first two are written for
clarity, not speed: they hold the video's frames in memory and re-encode shared frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vda_jax.inference.preprocess import network_size, preprocess
from vda_jax.inference.video import infer_video_depth
from vda_jax.inference.window import OVERLAP_FRAMES, WINDOW_FRAMES
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.ops.align import scale_and_shift
from vda_jax.ops.resize import resize_bilinear_align_corners


class Window(NamedTuple):
    """Input frames ``[start, start + 32)`` (past the end: the last frame again); output ``[first, stop)``."""

    start: int
    first: int
    stop: int


def windows(num_frames: int, overlap: int) -> list[Window]:
    """32-frame windows over a video, neighbours sharing ``overlap`` frames; each output frame once."""
    if num_frames < 1 or not 0 <= overlap < WINDOW_FRAMES:
        raise ValueError(f"need num_frames >= 1 and 0 <= overlap < {WINDOW_FRAMES}, got {num_frames}, {overlap}")
    starts = range(0, max(num_frames - overlap, 1), WINDOW_FRAMES - overlap)
    return [Window(s, s + overlap if s else 0, min(s + WINDOW_FRAMES, num_frames)) for s in starts]


@nnx.jit(static_argnames="net_size")
def _window_depth(model: VideoDepthAnything, frames: jax.Array, net_size: tuple[int, int]) -> jax.Array:
    """uint8 ``[32, H, W, 3]`` -> depth ``[32, H, W]`` at the frames' resolution."""
    chunks = model.frames_per_chunk(net_size)
    features = model.encode(preprocess(frames, net_size), chunks.encoder)
    depth, _ = model.decode(features, frames.shape[0], net_size, frames_per_chunk=chunks.head)
    return resize_bilinear_align_corners(depth[0], frames.shape[1:3], axes=(-2, -1))


def _as_video(frames: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    video = frames if isinstance(frames, np.ndarray) else np.stack(list(frames))
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or not len(video):
        raise ValueError(f"frames must be uint8 RGB [N, H, W, 3] with N >= 1, got {video.dtype} {video.shape}")
    return video


def _windowed_depth(model: VideoDepthAnything, frames: np.ndarray | Iterable[np.ndarray], overlap: int,
                    input_size: int, precision: str | None) -> np.ndarray:
    """Depth ``[N, H, W]``, each window aligned to the previous one over the ``overlap`` shared frames."""
    video = _as_video(frames)
    model = compute_model(model, precision)
    net_size = network_size(video.shape[1:3], input_size)
    align = overlap > 0 and not model.config.metric
    out, previous = [], None
    for w in windows(len(video), overlap):
        clip = video[w.start:w.start + WINDOW_FRAMES]
        clip = np.concatenate([clip, np.repeat(clip[-1:], WINDOW_FRAMES - len(clip), axis=0)])
        depth = _window_depth(model, jnp.asarray(clip), net_size)
        if align and previous is not None:
            scale, shift = scale_and_shift(depth[:overlap], previous[-overlap:], jnp.ones_like(depth[:overlap]))
            depth = jnp.maximum(depth * scale + shift, 0.0)
        out.append(np.asarray(depth[w.first - w.start:w.stop - w.start]))
        previous = depth
    return np.concatenate(out)


def no_overlap_depth(model: VideoDepthAnything, frames: np.ndarray | Iterable[np.ndarray], *,
                     input_size: int = 518, precision: str | None = None) -> np.ndarray:
    """The baseline: independent consecutive windows. uint8 ``[N, H, W, 3]`` -> float32 ``[N, H, W]``."""
    return _windowed_depth(model, frames, 0, input_size, precision)


def overlap_alignment_depth(model: VideoDepthAnything, frames: np.ndarray | Iterable[np.ndarray], *,
                            input_size: int = 518, precision: str | None = None) -> np.ndarray:
    """OA: windows aligned to their predecessor on 10 shared frames. uint8 ``[N, H, W, 3]`` -> ``[N, H, W]``."""
    return _windowed_depth(model, frames, OVERLAP_FRAMES, input_size, precision)


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "no_overlap": no_overlap_depth,
    "overlap_alignment": overlap_alignment_depth,
    "full": infer_video_depth,
}


def infer_with_strategy(model: VideoDepthAnything, frames: np.ndarray | Iterable[np.ndarray], strategy: str = "full",
                        *, input_size: int = 518, precision: str | None = None) -> np.ndarray:
    """Depth ``[N, H, W]`` of a video (uint8 ``[N, H, W, 3]`` or an iterable of frames) by ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](model, frames, input_size=input_size, precision=precision)
