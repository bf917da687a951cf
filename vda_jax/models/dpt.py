"""The spatio-temporal DPT head: reassemble, fuse, temporal layers, depth output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from vda_jax.config import ModelConfig
from vda_jax.models.layers import Dtype, UpConv, checkpointed, conv, map_frames
from vda_jax.models.temporal import Cache, TemporalModule, cache_part
from vda_jax.ops.resize import resize_bilinear_align_corners

_OUTPUT_HIDDEN = 32


class ResidualConvUnit(nnx.Module):
    """``x + conv(relu(conv(relu(x))))`` with 3x3 convolutions."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.conv1 = conv(features, features, 3, padding=1, rngs=rngs, dtype=dtype)
        self.conv2 = conv(features, features, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class FusionBlock(nnx.Module):
    """DPT feature fusion: add the refined skip, refine, upsample (align_corners), 1x1 conv."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.res_unit1 = ResidualConvUnit(features, rngs=rngs, dtype=dtype)
        self.res_unit2 = ResidualConvUnit(features, rngs=rngs, dtype=dtype)
        self.out_conv = conv(features, features, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None,
                 size: tuple[int, int] | None = None) -> jax.Array:
        if skip is not None:
            x = x + self.res_unit1(skip)
        x = self.res_unit2(x)
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.out_conv(resize_bilinear_align_corners(x, size))


class DPTHead(nnx.Module):
    """Depth head over four encoder levels, with temporal layers on the two coarsest.

    Levels are reassembled to strides 4, 8, 16 and 32 of the input (1x1 projection
    then x4 / x2 transposed conv, identity, stride-2 conv), fused coarse to fine, and
    decoded to one channel at the patch-grid resolution times the patch size.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        ch, feats = config.out_channels, config.features
        self.patch_size = config.patch_size
        self.projects = nnx.List([conv(config.embed_dim, c, 1, rngs=rngs, dtype=dtype) for c in ch])
        self.resize_layers = nnx.List([
            UpConv(ch[0], ch[0], 4, rngs=rngs, dtype=dtype),
            UpConv(ch[1], ch[1], 2, rngs=rngs, dtype=dtype),
            None,
            conv(ch[3], ch[3], 3, stride=2, padding=1, rngs=rngs, dtype=dtype),
        ])
        self.layer_rn = nnx.List([conv(c, feats, 3, padding=1, use_bias=False, rngs=rngs, dtype=dtype) for c in ch])
        self.refinenets = nnx.List([FusionBlock(feats, rngs=rngs, dtype=dtype) for _ in range(4)])
        temporal = dict(heads=config.temporal_heads, max_frames=config.num_frames, pe=config.pe, rngs=rngs, dtype=dtype)
        # Temporal layers on: reassembled level 3, level 4, fused path 4, fused path 3.
        self.temporal = nnx.List([TemporalModule(c, **temporal) for c in (ch[2], ch[3], feats, feats)])
        self.output_conv1 = conv(feats, feats // 2, 3, padding=1, rngs=rngs, dtype=dtype)
        # The last convolutions always run in float32 (low-precision depth quantises visibly).
        self.output_conv2 = conv(feats // 2, _OUTPUT_HIDDEN, 3, padding=1, rngs=rngs, dtype=jnp.float32)
        self.output_conv3 = conv(_OUTPUT_HIDDEN, 1, 1, rngs=rngs, dtype=jnp.float32)

    def __call__(self, features: tuple[jax.Array, ...], num_frames: int, cache: Cache | None = None,
                 frames_per_chunk: int | None = None, remat: bool = False,
                 frame_sharding: NamedSharding | None = None,
                 active: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """Decodes depth.

        Args:
          features: four ``[B*T, ph, pw, E]`` encoder outputs, frames of a clip adjacent.
          num_frames: T.
          cache: None for a clip; for streaming, ``()`` at a stream's first frame, or the
            ``temporal.Ring`` of past frames' keys and values (16 arrays ``[B, R, S, D]``: per
            temporal layer, the keys and values of its two attention sub-blocks).
          frames_per_chunk: run the layers after the last temporal one (per-frame, at the
            finest resolutions) this many frames at a time (``map_frames``); None runs
            all frames at once. The result does not depend on it.
          remat: rematerialise in the backward pass each temporal layer, each fusion block
            and each chunk of the per-frame end (only their inputs are kept).
          frame_sharding: how the frame axis is split over devices (see ``map_frames``).
          active: bool ``[B*T]``, the frames whose depth is needed, or None (all): chunks of
            the per-frame end without one are skipped and give zeros (``map_frames``). The
            temporal layers still see every frame.
        Returns:
          Depth ``[B*T, 14*ph, 14*pw]`` (float32, before the final resize and ReLU) and, for
          streaming, the first frame's temporal keys and values (16 arrays ``[B, T, S, D]``) or
          the updated ring's 16 arrays (a clip: ``()``).
        """
        n, ph, pw, _ = features[0].shape
        b, t = n // num_frames, num_frames
        layers = []
        for x, project, resize in zip(features, self.projects, self.resize_layers):
            x = project(x)
            layers.append(x if resize is None else resize(x))

        new_cache: list[jax.Array] = []

        def temporal(i: int, x: jax.Array) -> jax.Array:
            size = TemporalModule.cache_arrays
            layer_cache = cache_part(cache, size * i, size * (i + 1))
            y, states = checkpointed(self.temporal[i], remat)(x.reshape(b, t, *x.shape[1:]), layer_cache)
            new_cache.extend(states)
            return y.reshape(x.shape)

        layers[2] = temporal(0, layers[2])
        layers[3] = temporal(1, layers[3])
        rn = [layer_rn(x) for layer_rn, x in zip(self.layer_rn, layers)]
        path = checkpointed(lambda x: self.refinenets[3](x, size=rn[2].shape[1:3]), remat)(rn[3])
        path = temporal(2, path)
        path = checkpointed(lambda x, skip: self.refinenets[2](x, skip, size=rn[1].shape[1:3]), remat)(path, rn[2])
        path = temporal(3, path)
        output_size = (ph * self.patch_size, pw * self.patch_size)
        fine = checkpointed(lambda x: self._fine(x, output_size, remat), remat)
        out = map_frames(fine, (path, rn[1], rn[0]), frames_per_chunk, frame_sharding, active)
        return out, tuple(new_cache)

    def _fine(self, fine: tuple[jax.Array, jax.Array, jax.Array], output_size: tuple[int, int],
              remat: bool) -> jax.Array:
        """The per-frame end of the head: ``(path, rn1, rn0)`` -> depth ``[N, *output_size]``."""
        path, rn1, rn0 = fine
        path = checkpointed(lambda x, skip: self.refinenets[1](x, skip, size=rn0.shape[1:3]), remat)(path, rn1)
        path = checkpointed(self.refinenets[0], remat)(path, rn0)
        out = self.output_conv1(path)
        out = resize_bilinear_align_corners(out, output_size)
        out = jax.nn.relu(self.output_conv2(out.astype(jnp.float32)))
        return jax.nn.relu(self.output_conv3(out))[..., 0]
