"""Initial weights of a training run: random, a vda-jax model directory, or an official checkpoint (file or name)."""

from __future__ import annotations

import os

from flax import nnx

from vda_jax import pretrained
from vda_jax.checkpoint import abstract_model, load_checkpoint, read_config
from vda_jax.config import ModelConfig
from vda_jax.convert.convert import convert_state_dict
from vda_jax.convert.readers import checkpoint_kind, read_checkpoint
from vda_jax.models.layers import Dtype
from vda_jax.models.vda import VideoDepthAnything


def _is_name(source: str) -> bool:
    return source in pretrained.PRETRAINED and not os.path.exists(source)


def _check_source(source: str, config: ModelConfig) -> None:
    """Raises ValueError for an ``init_from`` that ``initial_model`` would refuse, reading no weights.

    A model directory must hold ``config``'s architecture; a file must be a .pth or safetensors
    checkpoint (the tensors are matched when read); a name's architecture is matched by the
    training config's checks (``vda_jax.train.config``).
    """
    if not source or _is_name(source):
        return
    if os.path.isdir(source):
        found, _ = read_config(source)
        if found != config:
            raise ValueError(f"init_from {source} holds a {found} model, but the config trains {config}; "
                             "make config.model match it")
    elif os.path.isfile(source):
        checkpoint_kind(source)
    else:
        raise ValueError(f"init_from {source!r} does not exist; give a vda-jax model directory, an official "
                         f".pth / .safetensors file or the name of one ({', '.join(pretrained.PRETRAINED)})")


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
    _check_source(source, config)
    if not source:
        return VideoDepthAnything(config, rngs=nnx.Rngs(seed), dtype=dtype)
    if _is_name(source):
        source = pretrained.download(source)
    if os.path.isdir(source):
        return load_checkpoint(source, dtype=dtype)
    state = nnx.state(convert_state_dict(read_checkpoint(source), config, seed=seed))
    graphdef, _ = abstract_model(config, dtype)
    return nnx.merge(graphdef, state)
