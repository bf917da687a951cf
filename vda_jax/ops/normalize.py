"""ImageNet normalisation of RGB frames, as the DINOv2 encoder expects (inference and training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vda_jax.config import IMAGENET_MEAN, IMAGENET_STD


def standardize(x: jax.Array) -> jax.Array:
    """Float RGB in [0, 1] ``[..., 3]`` -> ``(x - mean) / std`` per channel."""
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def normalize(frames: jax.Array) -> jax.Array:
    """uint8 RGB ``[..., 3]`` -> ImageNet-normalised float32."""
    return standardize(frames.astype(jnp.float32) / 255.0)
