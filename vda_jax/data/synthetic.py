"""Synthetic RGB-D videos: random rooms and streets rendered with ground-truth geometry."""

from __future__ import annotations

import numpy as np

from vda_jax.data import render
from vda_jax.data import scene as scene_lib

SCENE_KINDS = tuple(scene_lib.SCENE_KINDS)


def _color_jitter(rng: np.random.Generator):
    """A per-video photometric change: channel gains, gamma and a brightness offset."""
    gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    gamma = np.float32(rng.uniform(0.8, 1.25))
    bias = np.float32(rng.uniform(-0.05, 0.05))
    return lambda rgb: np.clip(rgb**gamma * gain + bias, 0, 1)


def render_video(
    seed: int, num_frames: int, height: int, width: int, *, scene_kind: str | None = None
) -> dict[str, np.ndarray]:
    """Renders a random video; the same arguments always give the same video.

    Args:
      seed: selects the scene, the camera path, the lighting and the colour jitter.
      num_frames, height, width: output size; frames are ``scene.FRAME_DT`` seconds apart.
      scene_kind: "room", "outdoor", or None to pick one from the seed.

    Returns:
      frames: [T, H, W, 3] uint8 RGB.
      depth: [T, H, W] float32 metric z-depth (along the optical axis), 0 where invalid.
      mask: [T, H, W] bool, valid depth (False on the sky and beyond the far distance).
      dynamic: [T, H, W] bool, valid pixels showing a moving object.
      K: [T, 3, 3] float32 intrinsics (pixel centres at integer coordinates).
      pose: [T, 4, 4] float32 camera-to-world, OpenCV axes (x right, y down, z forward).
    """
    if min(num_frames, height, width) < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}")
    rng = np.random.default_rng(seed)
    if scene_kind is None:
        scene_kind = SCENE_KINDS[rng.integers(len(SCENE_KINDS))]
    if scene_kind not in scene_lib.SCENE_KINDS:
        raise ValueError(f"unknown scene_kind {scene_kind!r}; choose one of {SCENE_KINDS} or None")
    duration = num_frames * scene_lib.FRAME_DT
    scene, path = scene_lib.SCENE_KINDS[scene_kind](rng, duration)
    jitter = _color_jitter(rng)
    K = path.intrinsics(height, width)

    frames = []
    for i in range(num_frames):
        t = i * scene_lib.FRAME_DT
        pose = path.pose(t)
        out = render.render_frame(scene, t, K, pose, height, width)
        out["frames"] = np.round(jitter(out.pop("rgb")) * 255).astype(np.uint8)
        out["pose"] = pose.astype(np.float32)
        frames.append(out)
    video = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
    video["K"] = np.broadcast_to(K.astype(np.float32), (num_frames, 3, 3)).copy()
    return video
