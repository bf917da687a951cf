"""DINOv2 ViT encoder (patch 14, layer scale, no registers), channels-last."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vda_jax.config import ModelConfig
from vda_jax.models.layers import Dtype, FusedLinear, attention, checkpointed, conv, gelu, layer_norm, linear
from vda_jax.models.partitioning import gather
from vda_jax.ops.resize import resize_torch_bicubic_by_scale

_LN_EPS = 1e-6


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection; ``implementation`` as ``layers.attention``'s."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype, implementation: str = "einsum"):
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = FusedLinear(dim, 3, dim, out_axis="heads", rngs=rngs, dtype=dtype)
        self.proj = linear(dim, dim, axes=("heads", None), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.implementation)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.fc1 = linear(dim, hidden, axes=(None, "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, dim, axes=("mlp", None), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
    """DINOv2's fused SwiGLU FFN (ViT-g): hidden width ``2/3 * mlp_ratio * dim`` rounded up to 8."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = linear(dim, 2 * hidden, rngs=rngs, dtype=dtype)
        self.w3 = linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float = 1.0):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Dtype, attention: str = "einsum"):
        dim = config.embed_dim
        ffn = {"mlp": Mlp, "swiglu": SwiGLU}[config.ffn]
        self.norm1 = layer_norm(dim, _LN_EPS, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, config.num_heads, rngs=rngs, dtype=dtype, implementation=attention)
        self.ls1 = LayerScale(dim)
        self.norm2 = layer_norm(dim, _LN_EPS, rngs=rngs, dtype=dtype)
        self.mlp = ffn(dim, int(dim * config.mlp_ratio), rngs=rngs, dtype=dtype)
        self.ls2 = LayerScale(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: jax.Array, patch_h: int, patch_w: int, offset: float) -> jax.Array:
    """Resizes DINOv2's square patch position grid to ``patch_h x patch_w``.

    Args:
      pos_embed: ``[1 + G*G, D]``, the cls position first.
      offset: DINOv2's ``interpolate_offset``; the grid is resized by PyTorch bicubic
        with the scale factor ``(patch + offset) / G``, not by ``patch / G``.
    Returns:
      ``[1 + patch_h * patch_w, D]``.
    """
    grid = math.isqrt(pos_embed.shape[0] - 1)
    if patch_h == patch_w == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:].reshape(grid, grid, -1)
    scale = ((patch_h + offset) / grid, (patch_w + offset) / grid)
    patch_pos = resize_torch_bicubic_by_scale(patch_pos.astype(jnp.float32), scale, axes=(0, 1))
    if patch_pos.shape[:2] != (patch_h, patch_w):
        raise ValueError(f"position-embedding resize gave {patch_pos.shape[:2]}, expected {(patch_h, patch_w)}")
    return jnp.concatenate([cls_pos, patch_pos.reshape(patch_h * patch_w, -1).astype(pos_embed.dtype)])


class DinoVisionTransformer(nnx.Module):
    """DINOv2 ViT returning the normed patch tokens of the configured blocks.

    ``attention``: the attention implementation (``layers.ATTENTION_IMPLEMENTATIONS``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 attention: str = "einsum"):
        dim, grid = config.embed_dim, config.pos_embed_grid
        self.config = config
        self.dtype = dtype
        self.patch_embed = conv(3, dim, config.patch_size, stride=config.patch_size, rngs=rngs, dtype=dtype)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, 1 + grid * grid, dim)))
        self.mask_token = nnx.Param(jnp.zeros((1, dim)))  # DINOv2's masked-patch token; unused at inference
        self.blocks = nnx.List([Block(config, rngs=rngs, dtype=dtype, attention=attention)
                                for _ in range(config.depth)])
        self.norm = layer_norm(dim, _LN_EPS, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array, remat: bool = False) -> tuple[jax.Array, ...]:
        """Encodes images.

        Args:
          images: ``[N, H, W, 3]``, ImageNet-normalised, H and W multiples of the patch size.
          remat: rematerialise each block in the backward pass (only its input is kept).
        Returns:
          One ``[N, H/14, W/14, D]`` feature map per configured intermediate block,
          taken through the final norm, the cls token dropped.
        """
        n, h, w, _ = images.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        ph, pw = h // p, w // p
        x = self.patch_embed(images.astype(self.dtype)).reshape(n, ph * pw, -1)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        pos_embed = gather(self.pos_embed[...], (None,) * 3)[0]  # gathered at use
        pos = interpolate_pos_embed(pos_embed, ph, pw, self.config.interpolate_offset)
        x = x + pos.astype(x.dtype)
        taken = set(self.config.intermediate_layers)
        outputs = []
        for i, block in enumerate(self.blocks[: max(taken) + 1]):
            x = checkpointed(block, remat)(x)
            if i in taken:
                outputs.append(self.norm(x)[:, 1:].reshape(n, ph, pw, -1))
        return tuple(outputs)

