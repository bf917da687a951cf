"""Initial weights of a training run: random, a vda-jax model directory, or an official checkpoint (file or name)."""

from __future__ import annotations

import os

from flax import nnx

from vda_jax import pretrained
from vda_jax.checkpoint import abstract_model, load_checkpoint
from vda_jax.config import ModelConfig
from vda_jax.convert.convert import convert_state_dict
from vda_jax.convert.readers import read_checkpoint
from vda_jax.models.layers import Dtype
from vda_jax.models.vda import VideoDepthAnything


def initial_model(config: ModelConfig, source: str, *, seed: int, dtype: Dtype) -> VideoDepthAnything:
    """The model a run starts from.

    Args:
      config: the architecture being trained; a checkpoint must hold exactly this one.
      source: "" for random weights (from ``seed``); a vda-jax model directory; an official
        Video Depth Anything / Depth Anything V2 ``.pth`` / ``.safetensors`` file (image models
        get identity temporal layers); or the name of one (``pretrained.PRETRAINED``), downloaded.
      seed: seed of the random weights (and of fresh temporal layers).
      dtype: compute dtype; parameters are float32.
    """
    if not source:
        return VideoDepthAnything(config, rngs=nnx.Rngs(seed), dtype=dtype)
    if source in pretrained.PRETRAINED and not os.path.exists(source):
        source = pretrained.download(source)
    if os.path.isdir(source):
        model = load_checkpoint(source, dtype=dtype)
        if model.config != config:
            raise ValueError(f"init_from {source} holds a {model.config} model, but the config trains {config}; "
                             "make config.model match it")
        return model
    if os.path.isfile(source):  # read_checkpoint recognises .pth / safetensors by content
        state = nnx.state(convert_state_dict(read_checkpoint(source), config, seed=seed))
        graphdef, _ = abstract_model(config, dtype)
        return nnx.merge(graphdef, state)
    raise ValueError(f"init_from {source!r} does not exist; give a vda-jax model directory, an official "
                     f".pth / .safetensors file or the name of one ({', '.join(pretrained.PRETRAINED)})")
