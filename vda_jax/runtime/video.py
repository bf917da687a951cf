"""The official long-video algorithm and the streaming loop around exported models, in NumPy.

The clip model sees windows of 32 frames every 22 frames; from the second window
on, its first 10 inputs are the previous window's inputs at the key frames.
Relative depths are aligned window to window (a least-squares scale and shift
on the two key frames), the 8 overlapping frames blended linearly (see
``vda_jax.inference.window`` for the JAX version of the same step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from vda_jax.inference import schedule
from vda_jax.runtime.preprocess import preprocess, resize_depth

ClipFn = Callable[[np.ndarray], np.ndarray]  # [1, 32, h, w, 3] float32 -> [1, 32, h, w]


def scale_and_shift(pred: np.ndarray, target: np.ndarray) -> tuple[np.float32, np.float32]:
    """Least-squares ``(s, b)`` minimising ``sum((s * pred + b - target) ** 2)``; ``(1, 0)`` if ``pred`` is flat."""
    pred, target = pred.astype(np.float64).ravel(), target.astype(np.float64).ravel()
    centred = pred - pred.mean()
    var = np.dot(centred, centred)
    if var <= 0:
        return np.float32(1.0), np.float32(0.0)
    scale = np.dot(centred, target - target.mean()) / var
    return np.float32(scale), np.float32(target.mean() - scale * pred.mean())


class _Aligner:
    """Carries the reference depths and the pending overlap from one window to the next."""

    def __init__(self, metric: bool):
        self.metric = metric
        self.reference: np.ndarray | None = None  # [2, H, W]
        self.pending: np.ndarray | None = None  # [8, H, W]

    def __call__(self, depth: np.ndarray) -> np.ndarray:
        """A window's depths ``[32, H, W]`` -> its final frames (the first window: 24, later ones: 22)."""
        first = self.reference is None
        if first:
            aligned = depth
        else:
            scale, shift = ((np.float32(1.0), np.float32(0.0)) if self.metric else
                            scale_and_shift(depth[:schedule.ALIGN_FRAMES], self.reference))
            aligned = np.maximum(depth * scale + shift, np.float32(0.0))
        overlap = aligned[schedule.ALIGN_FRAMES:schedule.OVERLAP_FRAMES]
        if not first:
            w = schedule.blend_weights()[:, None, None]
            overlap = self.pending * (np.float32(1.0) - w) + overlap * w
        final = np.concatenate([overlap, aligned[schedule.OVERLAP_FRAMES:schedule.FINAL_END]])
        self.reference = np.stack([aligned[0] if first else self.reference[0], aligned[schedule.KEYFRAMES[1]]])
        self.pending = aligned[schedule.FINAL_END:]
        return np.concatenate([aligned[:schedule.ALIGN_FRAMES], final]) if first else final


def video_depth(clip: ClipFn, frames: Iterable[np.ndarray], net_size: tuple[int, int], *,
                metric: bool = False) -> Iterator[np.ndarray]:
    """Yields the depth ``[n, H, W]`` of successive frames of a video as they become final.

    Args:
      clip: the exported clip model (32 frames at ``net_size``).
      frames: uint8 RGB ``[H, W, 3]`` frames, all of one size.
      net_size: the network input (h, w) the clip model was exported for.
      metric: a metric model (no scale/shift alignment).
    """
    iterator = iter(frames)
    read, last, frame_size = 0, None, None

    def take(count: int) -> np.ndarray:
        nonlocal read, last, frame_size
        out = []
        for frame in iterator:
            frame = np.asarray(frame)
            if frame_size is None:
                frame_size = frame.shape[:2]
            if frame.dtype != np.uint8 or frame.shape != (*frame_size, 3):
                raise ValueError(f"frame {read} is {frame.dtype} {frame.shape}; expected uint8 {(*frame_size, 3)}")
            out.append(frame)
            read += 1
            if len(out) == count:
                break
        if last is None and not out:
            raise ValueError("the video has no frames")
        last = out[-1] if out else last
        return np.stack(out + [last] * (count - len(out)))  # the last frame repeated past the end

    align = _Aligner(metric)
    inputs = preprocess(take(schedule.OVERLAP_FRAMES), net_size)
    emitted, window = 0, 0
    while schedule.STRIDE * window < read:
        inputs = np.concatenate([inputs, preprocess(take(schedule.STRIDE), net_size)])
        depth = resize_depth(np.asarray(clip(inputs[None]))[0], frame_size)
        final = align(depth)
        window += 1
        if schedule.STRIDE * window >= read:  # the last window: its overlap is final too
            final = np.concatenate([final, align.pending])
        keep = min(len(final), read - emitted)
        if keep > 0:
            yield final[:keep]
            emitted += keep
        inputs = inputs[np.asarray(schedule.KEYFRAMES)]


def stream_depth(step: Callable[..., list[np.ndarray]], frames: Iterable[np.ndarray], net_size: tuple[int, int],
                 ring: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Yields each frame's depth ``[H, W]`` as soon as the frame arrives, as the official streaming mode.

    Args:
      step: the exported streaming model, ``(frame, step, *ring) -> [depth, next_step, *next_ring]``.
      frames: uint8 RGB ``[H, W, 3]`` frames, all of one size.
      net_size: the network input (h, w) the model was exported for.
      ring: its initial temporal caches, keys and values (any values: the first frame seeds them).
    """
    counter, frame_size = np.zeros((), np.int32), None
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        frame_size = frame_size or frame.shape[:2]
        if frame.dtype != np.uint8 or frame.shape != (*frame_size, 3):
            raise ValueError(f"frame {i} is {frame.dtype} {frame.shape}; expected uint8 {(*frame_size, 3)}")
        depth, counter, *ring = step(preprocess(frame[None], net_size), counter, *ring)
        yield resize_depth(depth[0], frame_size)
