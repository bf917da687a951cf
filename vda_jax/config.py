"""Model configurations: the released variants as a size table, plus custom sizes."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from vda_jax.io.json_file import read_json

# Encoder sizes of DINOv2 (ViT-S/B/L/g with patch 14); the head sizes Video Depth
# Anything pairs with each.
_ENCODERS: dict[str, dict[str, Any]] = {
    "vits": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp", intermediate_layers=(2, 5, 8, 11),
                 features=64, out_channels=(48, 96, 192, 384)),
    "vitb": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp", intermediate_layers=(2, 5, 8, 11),
                 features=128, out_channels=(96, 192, 384, 768)),
    "vitl": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp", intermediate_layers=(4, 11, 17, 23),
                 features=256, out_channels=(256, 512, 1024, 1024)),
    "vitg": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu", intermediate_layers=(9, 19, 29, 39),
                 features=384, out_channels=(1536, 1536, 1536, 1536)),
}
ENCODERS = tuple(_ENCODERS)

# The encoder's input: RGB in [0, 1] normalised by ImageNet's per-channel statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Video Depth Anything model.

    Attributes:
      encoder: name of the size ("vits", "vitb", "vitl", "vitg" or "custom").
      embed_dim, depth, num_heads, mlp_ratio, ffn: the DINOv2 ViT ("mlp" or "swiglu" FFN).
      patch_size: ViT patch size in pixels.
      pos_embed_grid: side of the square position-embedding grid (37 for 518 px).
      interpolate_offset: DINOv2's offset added to the patch grid before the bicubic resize.
      intermediate_layers: blocks whose normed outputs feed the head.
      features, out_channels: DPT head widths.
      temporal_heads: attention heads of the temporal layers.
      num_frames: longest clip the temporal position encoding covers.
      pe: temporal position encoding, "ape" (sinusoidal) or "rope".
      metric: metric depth model (no scale/shift alignment between windows).
    """

    encoder: str = "vits"
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    patch_size: int = 14
    pos_embed_grid: int = 37
    interpolate_offset: float = 0.1
    intermediate_layers: tuple[int, ...] = (2, 5, 8, 11)
    features: int = 64
    out_channels: tuple[int, ...] = (48, 96, 192, 384)
    temporal_heads: int = 8
    num_frames: int = 32
    pe: str = "ape"
    metric: bool = False

    def __post_init__(self):
        checks = [
            (self.ffn in ("mlp", "swiglu"), f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}"),
            (self.pe in ("ape", "rope"), f"pe must be 'ape' or 'rope', got {self.pe!r}"),
            (self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads"),
            (len(self.out_channels) == 4, "out_channels must have 4 entries"),
            (len(self.intermediate_layers) == 4, "intermediate_layers must have 4 entries"),
            (all(0 <= i < self.depth for i in self.intermediate_layers),
             f"intermediate_layers {self.intermediate_layers} must index blocks 0..{self.depth - 1}"),
            (self.num_frames >= 1, "num_frames must be >= 1"),
            # The temporal layers group-normalise (32 groups) and split heads over these widths.
            (all(c % 32 == 0 and c % self.temporal_heads == 0
                 for c in (self.out_channels[2], self.out_channels[3], self.features)),
             f"features {self.features} and out_channels[2:] {self.out_channels[2:]} must be multiples of 32 "
             f"and of temporal_heads {self.temporal_heads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message}")
        object.__setattr__(self, "intermediate_layers", tuple(self.intermediate_layers))
        object.__setattr__(self, "out_channels", tuple(self.out_channels))

    @property
    def name(self) -> str:
        return f"{self.encoder}{'-metric' if self.metric else ''}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """Returns the config of a released variant: "vits", "vitb", "vitl", "vitg", with "-metric"."""
    encoder, _, suffix = name.partition("-")
    if encoder not in _ENCODERS or suffix not in ("", "metric"):
        raise ValueError(f"unknown model {name!r}; choose one of "
                         f"{[e + s for e in ENCODERS for s in ('', '-metric')]}")
    return ModelConfig(encoder=encoder, metric=suffix == "metric", **{**_ENCODERS[encoder], **overrides})


# Keys of the official architecture JSON (e.g. the fixtures' tiny_architecture.json) -> ours.
_ARCH_JSON_KEYS = {
    "embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "features": "features",
    "out_channels": "out_channels", "patch_size": "patch_size", "mlp_ratio": "mlp_ratio",
    "intermediate_layer_idx": "intermediate_layers", "pos_embed_grid": "pos_embed_grid",
    "interpolate_offset": "interpolate_offset", "temporal_heads": "temporal_heads",
    "num_frames": "num_frames", "pe": "pe", "ffn": "ffn", "metric": "metric", "encoder": "encoder",
}
# Keys of that JSON that describe options every released model leaves off.
_ARCH_JSON_FIXED = {"use_clstoken": False, "use_bn": False, "layer_scale_init": None}


def config_from_json(path: str) -> ModelConfig:
    """Reads an architecture: a JSON of ``ModelConfig`` fields or the official names (optionally under
    ``"architecture"``), or a vda-jax model directory (or its ``config.json``).

    Raises:
      ValueError: naming the file, for a file that is not such a JSON.
    """
    what = "give an architecture JSON or a vda-jax model directory"
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is a folder without a config.json; {what}")
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; {what}")
    values = read_json(path, what)
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an architecture's fields")
    if values.get("format") == "vda-jax":  # a model directory's config.json (checkpoint.FORMAT)
        return ModelConfig.from_dict(values["model"])
    values = values.get("architecture", values)
    out: dict[str, Any] = {"encoder": "custom"}
    for key, value in values.items():
        if key in _ARCH_JSON_FIXED:
            if _ARCH_JSON_FIXED[key] is not None and value != _ARCH_JSON_FIXED[key]:
                raise ValueError(f"{path}: {key}={value!r} is not supported (released models use "
                                 f"{_ARCH_JSON_FIXED[key]!r})")
            continue
        if key not in _ARCH_JSON_KEYS and key not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ValueError(f"{path}: unknown architecture key {key!r}")
        out[_ARCH_JSON_KEYS.get(key, key)] = value
    return ModelConfig(**out)
