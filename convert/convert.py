"""Official checkpoints (Video Depth Anything, Depth Anything V2) -> vda-jax model directories."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from vda_jax.convert.keymap import plan_conversion, transform_value
from vda_jax.convert.readers import checkpoint_kind, read_checkpoint

from vda_jax.checkpoint import abstract_model, check_model_output, flat_shapes, save_model
from vda_jax.config import ENCODERS, ModelConfig, config_from_json, model_config
from vda_jax.models.dpt import DPTHead
from vda_jax.models.vda import VideoDepthAnything

_TEMPORAL_PREFIX = "head.temporal."


def is_image_checkpoint(keys) -> bool:
    """Depth Anything V2 image checkpoints name their head ``depth_head`` and have no temporal layers."""
    return any(k.startswith("depth_head.") for k in keys)


def detect_config(shapes: Mapping[str, tuple[int, ...]], *, encoder: str | None = None,
                  metric: bool = False) -> ModelConfig:
    """Recognises vits / vitb / vitl / vitg from the tensor shapes."""
    if "pretrained.pos_embed" not in shapes:
        raise ValueError("not a Video Depth Anything or Depth Anything V2 checkpoint: no 'pretrained.pos_embed'")
    width = shapes["pretrained.pos_embed"][-1]
    detected = next((name for name in ENCODERS if model_config(name).embed_dim == width), None)
    if detected is None:
        raise ValueError(f"unknown encoder width {width}; describe the architecture with --config ARCH.json")
    if encoder is not None and encoder != detected:
        raise ValueError(f"--encoder {encoder} given but the checkpoint holds a {detected} encoder (width {width})")
    return model_config(detected + ("-metric" if metric else ""))


def convert_state_dict(tensors: Mapping[str, np.ndarray], config: ModelConfig, *,
                       seed: int = 0) -> VideoDepthAnything:
    """Builds our model from official tensors (strict: every tensor used, every parameter filled).

    Image checkpoints (Depth Anything V2) leave the temporal layers freshly initialised
    with their output projections at zero, so each temporal layer starts as the identity
    and the model reproduces the image model frame by frame.
    """
    graphdef, abstract = abstract_model(config)
    image = is_image_checkpoint(tensors)
    plan = plan_conversion({k: tuple(v.shape) for k, v in tensors.items()}, flat_shapes(abstract),
                           allow_unfilled=(_TEMPORAL_PREFIX,) if image else ())
    values = {path: transform_value(np.asarray(tensors[key]), transform)
              for key, (path, transform) in plan.moves.items()}
    if plan.unfilled:
        fresh = nnx.state(DPTHead(config, rngs=nnx.Rngs(seed)))
        values.update({f"head.{'.'.join(map(str, p))}": v.get_value() for p, v in nnx.to_flat_state(fresh)
                       if f"head.{'.'.join(map(str, p))}" in plan.unfilled})
    for path, variable in nnx.to_flat_state(abstract):
        dotted = ".".join(map(str, path))
        variable.set_value(jnp.asarray(values[dotted], dtype=variable.get_value().dtype))
    return nnx.merge(graphdef, abstract)


def convert_checkpoint(source: str, output_dir: str, *, encoder: str | None = None, metric: bool = False,
                       config_path: str | None = None, config: ModelConfig | None = None,
                       metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> ModelConfig:
    """Reads an official ``.pth`` / ``.safetensors`` file and writes a vda-jax model directory.

    The architecture is ``config``, else read from ``config_path`` (an architecture JSON or a
    model directory; ``encoder``, given with it, must agree with it), else detected from the
    tensor shapes. ``metadata`` is recorded in the directory's ``config.json``. The model is
    written by this process alone, also in a multi-process job.
    """
    check_model_output(output_dir, overwrite=overwrite)  # before the work
    checkpoint_kind(source)
    if config is None and config_path is not None:
        config = config_from_json(config_path)
        if encoder is not None and encoder != config.encoder:
            raise ValueError(f"--encoder {encoder} contradicts --config {config_path}, which describes a "
                             f"{config.encoder} encoder; drop one of them")
        if metric and not config.metric:
            config = ModelConfig.from_dict({**config.to_dict(), "metric": True})
    tensors = read_checkpoint(source)
    if config is None:
        config = detect_config({k: v.shape for k, v in tensors.items()}, encoder=encoder, metric=metric)
    model = convert_state_dict(tensors, config)
    save_model(model, output_dir, overwrite=overwrite, local=True,
               metadata={"source": os.path.basename(source), "from_image_model": is_image_checkpoint(tensors),
                         **(metadata or {})})
    return config
