"""Clip augmentations that keep depth, validity, intrinsics and poses consistent.

A clip is a dict of ``frames`` uint8 ``[T, H, W, 3]``, ``depth`` float32 ``[T, H, W]``,
``mask`` bool ``[T, H, W]``, ``K`` ``[T, 3, 3]`` and ``pose`` ``[T, 4, 4]`` (camera-to-world,
OpenCV axes), plus any other keys, which pass through. Every random choice is drawn once per
clip, so all frames of a clip get the same crop, flip and colour change. Pixel centres sit at
integer coordinates (OpenCV convention) in K.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# A left-right flip of the image mirrors the camera's x axis: camera-to-world poses are
# post-multiplied by this reflection, so world points and reprojection are unchanged.
_MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0]).astype(np.float32)


def resize_crop(
    clip: dict,
    size: tuple[int, int],
    offset: tuple[int, int],
    crop: tuple[int, int],
    *,
    flip: bool = False,
    color_table: list[int] | None = None,
) -> dict:
    """Resizes every frame to ``size`` (h, w), crops the window at ``offset`` (y, x) of shape ``crop``.

    RGB is resampled bilinearly (antialiased when shrinking); depth and mask take the nearest
    sample so no depth is invented across edges. With ``flip`` the result is mirrored
    left-right, which mirrors the camera's x axis: K and the poses change to match, so
    reprojection between frames stays exact. ``color_table`` (from ``jitter_table``) maps
    the RGB values.
    """
    frames = clip["frames"]
    height, width = frames.shape[1:3]
    sy, sx = size[0] / height, size[1] / width
    (y0, x0), (ch, cw) = offset, crop
    box = (x0 / sx, y0 / sy, (x0 + cw) / sx, (y0 + ch) / sy)
    images = [Image.fromarray(f).resize((cw, ch), Image.Resampling.BILINEAR, box=box) for f in frames]
    if flip:
        images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
    if color_table is not None:
        images = [image.point(color_table) for image in images]
    rows = np.minimum(((y0 + np.arange(ch) + 0.5) / sy).astype(np.int64), height - 1)
    cols = np.minimum(((x0 + np.arange(cw) + 0.5) / sx).astype(np.int64), width - 1)
    K = clip["K"].copy()
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    K[..., 0, 2] += 0.5 * sx - 0.5 - x0
    K[..., 1, 2] += 0.5 * sy - 0.5 - y0
    pose = clip["pose"]
    if flip:
        cols = cols[::-1]
        K[..., 0, 2] = cw - 1 - K[..., 0, 2]
        K[..., 0, 1] *= -1
        pose = pose @ _MIRROR_X

    def gather(x):
        return np.take(np.take(x, rows, axis=1), cols, axis=2)

    return {
        **clip,
        "frames": np.stack([np.asarray(image) for image in images]),
        "depth": gather(clip["depth"]),
        "mask": gather(clip["mask"]),
        "K": K,
        "pose": pose,
    }


def jitter_table(rng: np.random.Generator, strength: float) -> list[int]:
    """A random brightness, contrast, gamma and per-channel gain as a PIL ``point`` table.

    The 768 entries are the R, G and B lookup tables of uint8 values, one after the other.
    """
    brightness, contrast = rng.uniform(1 - strength, 1 + strength, 2)
    gamma = np.exp(rng.uniform(-strength, strength))
    gain = rng.uniform(1 - strength / 2, 1 + strength / 2, 3)
    levels = np.linspace(0, 1, 256)[:, None] ** gamma * gain * brightness  # [256, 3]
    lut = np.clip(((levels - 0.5) * contrast + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)
    return lut.T.ravel().tolist()


def augment(
    clip: dict, rng: np.random.Generator, *, crop: tuple[int, int], max_scale: float, flip_prob: float, jitter: float
) -> dict:
    """Random resize/crop to ``crop`` covering a zoom in [1, max_scale], flip, colour jitter.

    The zoom is relative to the smallest scale at which the frames cover the crop.
    """
    height, width = clip["frames"].shape[1:3]
    scale = max(crop[0] / height, crop[1] / width) * rng.uniform(1.0, max_scale)
    size = (max(crop[0], round(height * scale)), max(crop[1], round(width * scale)))
    offset = (int(rng.integers(0, size[0] - crop[0] + 1)), int(rng.integers(0, size[1] - crop[1] + 1)))
    flip = bool(rng.random() < flip_prob)
    table = jitter_table(rng, jitter) if jitter > 0 else None
    return resize_crop(clip, size, offset, crop, flip=flip, color_table=table)
