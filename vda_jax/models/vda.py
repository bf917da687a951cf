"""Video Depth Anything: the DINOv2 encoder followed by the spatio-temporal DPT head."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from vda_jax.config import ModelConfig
from vda_jax.models.dpt import DPTHead
from vda_jax.models.layers import Dtype, map_frames
from vda_jax.models.temporal import Cache
from vda_jax.models.vit import DinoVisionTransformer
from vda_jax.ops.resize import resize_bilinear_align_corners


class VideoDepthAnything(nnx.Module):
    """Relative (or metric) depth for clips of up to ``config.num_frames`` frames.

    ``dtype`` is the compute dtype (parameters stay float32): ``jnp.bfloat16`` runs the
    encoder and head in bfloat16 and keeps the last convolutions in float32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype: Dtype = jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.encoder = DinoVisionTransformer(config, rngs=rngs, dtype=dtype)
        self.head = DPTHead(config, rngs=rngs, dtype=dtype)

    def encode(self, frames: jax.Array, frames_per_chunk: int | None = None) -> tuple[jax.Array, ...]:
        """Per-frame encoder features: ``[N, H, W, 3]`` -> four ``[N, H/14, W/14, E]``.

        ``frames_per_chunk`` frames go through the encoder at a time (``map_frames``).
        """
        return map_frames(self.encoder, frames, frames_per_chunk)

    def decode(self, features: tuple[jax.Array, ...], num_frames: int, image_size: tuple[int, int],
               cache: Cache | None = None, frames_per_chunk: int | None = None) -> tuple[jax.Array, Cache]:
        """Head + final resize: features of ``B*T`` frames -> depth ``[B, T, H, W]`` and temporal states.

        ``frames_per_chunk`` frames at a time go through the head's finest layers (see ``DPTHead``).
        """
        depth, new_cache = self.head(features, num_frames, cache, frames_per_chunk)
        depth = resize_bilinear_align_corners(depth[..., None], image_size)[..., 0]
        depth = jax.nn.relu(depth)
        return depth.reshape(-1, num_frames, *image_size), new_cache

    def __call__(self, frames: jax.Array, frames_per_chunk: int | None = None) -> jax.Array:
        """Depth of clips.

        Args:
          frames: ``[B, T, H, W, 3]`` ImageNet-normalised RGB, H and W multiples of 14,
            1 <= T <= ``config.num_frames`` (T = 1 is image mode).
          frames_per_chunk: frames the per-frame parts run at a time (``map_frames``).
        Returns:
          ``[B, T, H, W]`` float32 depth (relative: larger is nearer; metric: metres).
        """
        chex.assert_rank(frames, 5)
        b, t, h, w, c = frames.shape
        if c != 3 or not 1 <= t <= self.config.num_frames:
            raise ValueError(f"expected frames [B, T, H, W, 3] with 1 <= T <= {self.config.num_frames}, "
                             f"got shape {frames.shape}")
        features = self.encode(frames.reshape(b * t, h, w, c), frames_per_chunk)
        return self.decode(features, t, (h, w), frames_per_chunk=frames_per_chunk)[0]


def with_compute_dtype(model: VideoDepthAnything, dtype: Dtype) -> VideoDepthAnything:
    """The same parameters (shared, not copied) computing in ``dtype``."""
    if model.encoder.dtype == dtype:
        return model
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VideoDepthAnything(model.config, dtype=dtype)))
    return nnx.merge(graphdef, nnx.state(model))
