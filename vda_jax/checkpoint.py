"""Our on-disk model format: ``config.json`` + an orbax checkpoint of the parameters.

Layout of a model directory::

    DIR/config.json   {"format": "vda-jax", "version": 1, "model": ModelConfig fields, ...}
    DIR/params/       orbax StandardCheckpointer tree of the model's variables

Directories are written under a temporary name next to the target and renamed
into place when complete, so a failed or interrupted write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vda_jax.config import ModelConfig
from vda_jax.models.layers import Dtype
from vda_jax.models.vda import VideoDepthAnything

FORMAT = "vda-jax"
VERSION = 1


class CheckpointFormatError(ValueError):
    """A model directory is missing, incomplete or from an incompatible version."""


def abstract_model(config: ModelConfig, dtype: Dtype = jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and a state of ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    model = nnx.eval_shape(lambda: VideoDepthAnything(config, rngs=nnx.Rngs(0), dtype=dtype))
    return nnx.split(model)


def flat_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every variable in ``state``."""
    return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


def count_params(model_or_state: nnx.Module | nnx.State) -> int:
    """Number of trainable parameters (``nnx.Param``; buffers excluded)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)))


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary directory that replaces ``path`` (see ``check_model_output``) if the block succeeds."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_model_output(path: str, *, overwrite: bool = False) -> None:
    """Raises ``FileExistsError`` unless ``save_model(..., path, overwrite=overwrite)`` may write there.

    Overwriting replaces only a vda-jax model directory (or an empty one), never other files.
    """
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output directory or pass --overwrite")
    if not os.path.isdir(path) or os.path.islink(path):
        raise FileExistsError(f"{path} exists and is not a directory; remove it or choose another output directory")
    if not os.listdir(path):
        return
    try:
        with open(os.path.join(path, "config.json")) as f:
            ours = json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object
        ours = False
    if not ours:
        raise FileExistsError(f"{path} exists and is not a vda-jax model directory; --overwrite only replaces "
                              "those: remove it yourself or choose another output directory")


def save_model(model: VideoDepthAnything, path: str, *, metadata: dict[str, Any] | None = None,
               overwrite: bool = False) -> None:
    """Writes ``model`` (its config and all variables) to the directory ``path``, atomically."""
    check_model_output(path, overwrite=overwrite)
    state = nnx.state(model)
    with atomic_directory(path) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
            checkpointer.wait_until_finished()
        info = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **(metadata or {})}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(info, f, indent=2)


def read_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads ``DIR/config.json``: the model config and the rest of the metadata."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        official = str(path).endswith((".pth", ".safetensors"))
        hint = " (convert official .pth files with `vda-jax convert`)" if official else ""
        raise CheckpointFormatError(f"{path} is not a vda-jax model directory: no config.json{hint}")
    try:
        with open(config_path) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_path} is not valid JSON ({e}); re-run the conversion") from e
    if info.get("format") != FORMAT or info.get("version", 0) > VERSION:
        raise CheckpointFormatError(f"{config_path}: unsupported format {info.get('format')!r} "
                                    f"version {info.get('version')!r}; upgrade vda-jax")
    return ModelConfig.from_dict(info["model"]), info


def load_checkpoint(path: str, *, dtype: Dtype = jnp.float32) -> VideoDepthAnything:
    """Loads a converted or trained model directory.

    Args:
      path: a directory written by ``vda-jax convert``, ``save_model`` or training.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
    Returns:
      A ready ``VideoDepthAnything``: ``model(frames [B, T, H, W, 3]) -> [B, T, H, W]``.
    """
    config, _ = read_config(path)
    graphdef, abstract = abstract_model(config, dtype)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointFormatError(f"{path} has no params/ directory: the model directory is incomplete")
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(abstract))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax raises many types for truncated or foreign trees
        raise CheckpointFormatError(f"cannot read the parameters in {params_dir}: {e}".splitlines()[0]) from e
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)
