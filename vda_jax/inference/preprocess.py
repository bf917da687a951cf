"""Frames -> network input: the official size rule, OpenCV-cubic resize, ImageNet normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vda_jax.inference.sizing import network_size
from vda_jax.ops.normalize import standardize
from vda_jax.ops.resize import resize_opencv_cubic

__all__ = ["network_size", "preprocess"]


def preprocess(frames: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 RGB ``[..., H, W, 3]`` -> normalised float32 ``[..., h, w, 3]`` (jit-friendly)."""
    x = frames.astype(jnp.float32) / 255.0
    return standardize(resize_opencv_cubic(x, size))
