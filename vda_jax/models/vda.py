"""Video Depth Anything: the DINOv2 encoder followed by the spatio-temporal DPT head."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from vda_jax.config import ModelConfig
from vda_jax.devices import GIB, MIB, Platform
from vda_jax.models.dpt import DPTHead
from vda_jax.models.layers import ATTENTION_IMPLEMENTATIONS, Dtype, chunk_frames, default_attention, map_frames
from vda_jax.models.temporal import Cache
from vda_jax.models.vit import DinoVisionTransformer
from vda_jax.ops.resize import resize_bilinear_align_corners
from vda_jax.precision import compute_dtype, default_precision, matmul_precision


class VideoDepthAnything(nnx.Module):
    """Relative (or metric) depth for clips of up to ``config.num_frames`` frames.

    Compute options (static: part of the graph, not of the parameters; ``compute_model``
    sets them from a precision name):
      dtype: the compute dtype (parameters stay float32): ``jnp.bfloat16`` runs the
        encoder and head in bfloat16 and keeps the last convolutions in float32.
      matmul_precision: ``jax.default_matmul_precision`` of the model's matmuls and
        convolutions ("highest": true float32 on every backend; None: JAX's default).
      attention: the encoder's attention implementation (``layers.ATTENTION_IMPLEMENTATIONS``).
      chunk_bytes: per-device bytes each per-frame part (the encoder, the head's end) may use
        at a time at inference (``frames_per_chunk``); 0 runs them one frame at a time.
      frame_sharding: how the frame axis given to ``encode`` / ``decode`` is split over
        devices (e.g. ``NamedSharding(mesh, P("data"))``), or None; chunks then take frames
        from every device at once (``map_frames``), so no collectives run in the loop.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype: Dtype = jnp.float32,
                 matmul_precision: str | None = "highest", attention: str = "einsum", chunk_bytes: int = 0,
                 frame_sharding: NamedSharding | None = None):
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {attention!r}; "
                             f"choose one of {list(ATTENTION_IMPLEMENTATIONS)}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.matmul_precision = matmul_precision
        self.attention = attention
        self.chunk_bytes = chunk_bytes
        self.frame_sharding = frame_sharding
        self.encoder = DinoVisionTransformer(config, rngs=rngs, dtype=dtype, attention=attention)
        self.head = DPTHead(config, rngs=rngs, dtype=dtype)

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)

    def options(self) -> dict[str, object]:
        """The compute options (see the class), by name."""
        return dict(dtype=self.encoder.dtype, matmul_precision=self.matmul_precision, attention=self.attention,
                    chunk_bytes=self.chunk_bytes, frame_sharding=self.frame_sharding)

    def frames_per_chunk(self, net_size: tuple[int, int]) -> FrameChunks:
        """Frames each per-frame part takes at a time at ``net_size`` to stay within ``chunk_bytes``."""
        encoder, head = frame_bytes(self.config, net_size, self.encoder.dtype)
        return FrameChunks(chunk_frames(encoder, self.chunk_bytes), chunk_frames(head, self.chunk_bytes))

    def encode(self, frames: jax.Array, frames_per_chunk: int | None = None, remat: bool = False,
               active: jax.Array | None = None,
               prepare: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, ...]:
        """Per-frame encoder features: ``[N, H, W, 3]`` -> four ``[N, H/14, W/14, E]``.

        ``frames_per_chunk`` frames (per frame shard) go through the encoder at a time
        (``map_frames``); ``remat`` rematerialises each block in the backward pass.
        ``active`` (bool ``[N]``): only these frames' features are needed (``map_frames``).
        ``prepare``: applied to each chunk first (e.g. uint8 frames -> network input), so
        skipped frames are not prepared either.
        """
        prepare = prepare or (lambda x: x)
        with self._precision():
            return map_frames(lambda x: self.encoder(prepare(x), remat), frames, frames_per_chunk,
                              self.frame_sharding, active)

    def decode(self, features: tuple[jax.Array, ...], num_frames: int, image_size: tuple[int, int],
               cache: Cache | None = None, frames_per_chunk: int | None = None,
               remat: bool = False, active: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """Head + final resize: features of ``B*T`` frames -> depth ``[B, T, H, W]`` and temporal keys/values.

        ``cache``, ``frames_per_chunk``, ``remat`` and ``active`` are ``DPTHead``'s (``cache=()``
        starts a stream).
        """
        with self._precision():
            depth, new_cache = self.head(features, num_frames, cache, frames_per_chunk, remat, self.frame_sharding,
                                         active)
            depth = resize_bilinear_align_corners(depth[..., None], image_size)[..., 0]
        depth = jax.nn.relu(depth)
        return depth.reshape(-1, num_frames, *image_size), new_cache

    def __call__(self, frames: jax.Array, frames_per_chunk: int | FrameChunks | None = None) -> jax.Array:
        """Depth of clips.

        Args:
          frames: ``[B, T, H, W, 3]`` ImageNet-normalised RGB, H and W multiples of 14,
            1 <= T <= ``config.num_frames`` (T = 1 is image mode).
          frames_per_chunk: frames the per-frame parts run at a time (``map_frames``): one
            number for both, or ``FrameChunks`` (e.g. ``frames_per_chunk(net_size)``).
        Returns:
          ``[B, T, H, W]`` float32 depth (relative: larger is nearer; metric: metres).
        """
        chex.assert_rank(frames, 5)
        b, t, h, w, c = frames.shape
        if c != 3 or not 1 <= t <= self.config.num_frames:
            raise ValueError(f"expected frames [B, T, H, W, 3] with 1 <= T <= {self.config.num_frames}, "
                             f"got shape {frames.shape}")
        if not isinstance(frames_per_chunk, FrameChunks):
            frames_per_chunk = FrameChunks(frames_per_chunk, frames_per_chunk)
        features = self.encode(frames.reshape(b * t, h, w, c), frames_per_chunk.encoder)
        return self.decode(features, t, (h, w), frames_per_chunk=frames_per_chunk.head)[0]


class FrameChunks(NamedTuple):
    """Frames (per device) the encoder and the head's per-frame end run at a time (None: all)."""
    encoder: int | None
    head: int | None


class FrameBytes(NamedTuple):
    """One frame's peak intermediate bytes in the encoder and in the head's per-frame end."""
    encoder: int
    head: int


def frame_bytes(config: ModelConfig, net_size: tuple[int, int], dtype: Dtype) -> FrameBytes:
    """A rough upper estimate of one frame's peak intermediate bytes in each per-frame part."""
    size = jnp.dtype(dtype).itemsize
    ph, pw = net_size[0] // config.patch_size, net_size[1] // config.patch_size
    tokens, dim = ph * pw + 1, config.embed_dim
    # Attention logits (float32) and weights, the MLP's hidden layer and its GELU, a few residual streams.
    encoder = (config.num_heads * tokens**2 * (4 + size) + 2 * tokens * int(dim * config.mlp_ratio) * size
               + 6 * tokens * dim * size)
    # The finest fusion block (stride 2 of the patch grid x 8), output_conv1 resized to the input
    # size and cast to float32, the float32 output convolutions.
    feats, pixels = config.features, net_size[0] * net_size[1]
    head = 4 * (8 * ph) * (8 * pw) * feats * size + pixels * (feats // 2) * (size + 4) + 2 * pixels * 32 * 4
    return FrameBytes(encoder, head)


def default_chunk_bytes(platform: Platform) -> int:
    """``chunk_bytes`` for a program's devices (``Platform.of``).

    CPU: 12 MiB, so a chunk's working set stays in a server CPU's last-level cache: 4 frames
    of the vits encoder at 112x196, 2 at 140x252, 1 from 196x350 on (where one frame alone
    is fastest). A window step on a 2-core EPYC with 32 MiB of L3 (Tokyo 720p @112, 22 frames
    encoded; davis 540p @140): 1352 ms vs 1463 ms one frame at a time; 2063 vs 2157 ms.
    Accelerators: 1/40 of a device's memory (2 GiB on an 80 GiB H100, 0.4 GiB on a 16 GiB
    TPU v5e), 2 GiB where the memory is unknown.
    """
    if platform.kind == "cpu":
        return 12 * MIB
    return 2 * GIB if platform.memory_bytes is None else platform.memory_bytes // 40


_TOP_LEVEL_OPTIONS = ("matmul_precision", "chunk_bytes", "frame_sharding")  # read by this class's methods only


def with_options(model: VideoDepthAnything, **options) -> VideoDepthAnything:
    """The same parameters (shared, not copied) with some compute options changed (see the class).

    Options the submodules hold (``dtype``, ``attention``) take a new graph, built once per
    model config and options; the others are set on a copy of the module tree (milliseconds:
    building a graph abstractly takes seconds).
    """
    current = model.options()
    options = {**current, **options}
    if options == current:
        return model
    if (options["dtype"], options["attention"]) == (current["dtype"], current["attention"]):
        graphdef = nnx.graphdef(model)
    else:
        graphdef = _graphdef(model.config, options["dtype"], options["attention"])
    copy = nnx.merge(graphdef, nnx.state(model))
    for name in _TOP_LEVEL_OPTIONS:
        setattr(copy, name, options[name])
    return copy


@functools.lru_cache(maxsize=16)
def _graphdef(config: ModelConfig, dtype: Dtype, attention: str) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: VideoDepthAnything(config, dtype=dtype, attention=attention)))


def compute_model(model: VideoDepthAnything, precision: str | None = None, *,
                  devices: Sequence[jax.Device] | None = None, attention: str | None = None,
                  chunk_bytes: int | None = None) -> VideoDepthAnything:
    """The same parameters (shared, not copied) computing at ``precision`` ("fp32", "tf32", "bf16").

    An option left None takes the default of the ``devices`` the model's programs are compiled
    for (``Platform.of``; default ``jax.devices()``): ``precision.default_precision``,
    ``layers.default_attention``, ``default_chunk_bytes``.
    """
    platform = Platform.of(devices)
    precision = precision or default_precision(platform)
    return with_options(model, dtype=compute_dtype(precision), matmul_precision=matmul_precision(precision),
                        attention=attention or default_attention(platform),
                        chunk_bytes=default_chunk_bytes(platform) if chunk_bytes is None else chunk_bytes)
