"""Our on-disk model format: ``config.json`` + an orbax checkpoint of the parameters.

Layout of a model directory::

    DIR/config.json   {"format": "vda-jax", "version": 2, "model": ModelConfig fields, ...}
    DIR/params/       orbax StandardCheckpointer tree of the model's variables

Version 1 stored the fused projections (``FusedLinear``: ViT ``attn.qkv``, temporal
``ff.proj``) with their parts merged, kernel ``[in, P*out]`` and bias ``[P*out]``; they
are split into ``[in, P, out]`` / ``[P, out]`` on load.

Directories are written under a temporary name next to the target and renamed
into place when complete, so a failed or interrupted write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from vda_jax.config import ModelConfig
from vda_jax.io.json_file import read_json
from vda_jax.io.paths import check_output_folder
from vda_jax.models.layers import Dtype, FusedLinear
from vda_jax.models.vda import VideoDepthAnything

FORMAT = "vda-jax"
VERSION = 2


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


def _this_process_only(operation: str) -> ocp.options.MultiprocessingOptions:
    """Orbax options for a read or write by this process alone, with no barrier with the others."""
    process = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=process, active_processes={process},
                                              barrier_sync_key_prefix=f"{operation}-{process}")


@contextlib.contextmanager
def atomic_directory(path: str, *, local: bool = False) -> Iterator[str]:
    """Yields a temporary directory that replaces ``path`` (see ``check_model_output``) if the block succeeds.

    In a multi-process job every process must enter it (all write into one temporary
    directory on a shared file system); process 0 creates and renames it. With ``local``
    this process alone writes it, whatever the other processes do.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    primary, multi_process = (True, False) if local else (jax.process_index() == 0, jax.process_count() > 1)
    if multi_process:
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-shared")
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed job
            os.makedirs(tmp)
        multihost_utils.sync_global_devices(f"created {tmp}")
    else:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp)  # not mkdtemp, whose 0700 would outlive the rename: the umask decides, as for any folder
    try:
        yield tmp
        if multi_process:
            multihost_utils.sync_global_devices(f"written {tmp}")
        if primary:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        if multi_process:
            multihost_utils.sync_global_devices(f"renamed {tmp}")
    finally:
        if primary and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_model_output(path: str, *, overwrite: bool = False) -> None:
    """Raises ``FileExistsError`` unless ``save_model(..., path, overwrite=overwrite)`` may write there.

    Overwriting replaces only a vda-jax model directory (or an empty one), never other files.
    """
    if not os.path.lexists(path):
        check_output_folder(path, "output directory")
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
               overwrite: bool = False, local: bool = False) -> None:
    """Writes ``model`` (its config and all variables) to the directory ``path``, atomically.

    The variables may be sharded over the processes of a multi-process job; then every process
    calls this, each writing its shards. With ``local`` this process writes a model held on its
    own devices, alone (as a conversion does).
    """
    check_model_output(path, overwrite=overwrite)
    state = nnx.state(model)
    tree = nnx.to_pure_dict(state)
    with atomic_directory(path, local=local) as tmp:
        options = _this_process_only("save") if local else ocp.options.MultiprocessingOptions()
        with ocp.StandardCheckpointer(multiprocessing_options=options) as checkpointer:
            # Orbax refuses arrays local to one process of a multi-process job; NumPy copies it writes as is.
            checkpointer.save(os.path.join(tmp, "params"), jax.device_get(tree) if local else tree)
            checkpointer.wait_until_finished()
        if local or jax.process_index() == 0:
            info = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **(metadata or {})}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(info, f, indent=2)


def read_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads ``DIR/config.json``: the model config and the rest of the metadata.

    Raises:
      CheckpointFormatError: ``path`` is not a model directory (the message says what it is
        instead, e.g. a training workdir or an official checkpoint file) or is of a newer version.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path} does not exist; give a model directory from `vda-jax convert` or "
                                    "training")
    if not os.path.isdir(path):
        hint = next((h for suffixes, h in _FILE_HINTS if str(path).endswith(suffixes)), "")
        raise CheckpointFormatError(f"{path} is a file, not a vda-jax model directory{hint}")
    if not os.path.isfile(config_path):
        raise CheckpointFormatError(f"{path} is not a vda-jax model directory: no config.json")
    info = read_json(config_path, "re-run the conversion", CheckpointFormatError)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        if isinstance(info, dict) and "optimizer" in info:  # a training config: DIR is a workdir
            model = os.path.join(path, "model")
            where = (f"give {model}" if os.path.isdir(model) else
                     f"its model is written when training ends, or now by `vda-jax checkpoint-to-model {path} OUT`")
            raise CheckpointFormatError(f"{path} is a training workdir, not a model directory; {where}")
        raise CheckpointFormatError(f"{path} is not a vda-jax model directory: {config_path} is not a vda-jax "
                                    "model config")
    version = info.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointFormatError(f"{config_path}: model format version {version!r} is newer than this vda-jax "
                                    f"reads ({VERSION}); upgrade vda-jax")
    return ModelConfig.from_dict(info["model"]), info


# What a file given for a model directory probably is, and where it goes instead.
_FILE_HINTS = (
    ((".pth", ".safetensors"), " (convert official .pth / .safetensors files with `vda-jax convert`)"),
    ((".onnx",), " (run exported ONNX models with `vda-jax infer --onnx`)"),
)


def _fused_parameters(model: VideoDepthAnything) -> list[tuple]:
    """Paths (in ``nnx.to_pure_dict`` trees) of the ``FusedLinear`` kernels and biases of ``model``."""
    return [(*path, leaf) for path, node in nnx.iter_graph(model) if isinstance(node, FusedLinear)
            for leaf in ("kernel", "bias")]


def _at(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_checkpoint(path: str, *, dtype: Dtype = jnp.float32) -> VideoDepthAnything:
    """Loads a converted or trained model directory.

    Args:
      path: a directory written by ``vda-jax convert``, ``save_model`` or training.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
    Returns:
      A ready ``VideoDepthAnything``: ``model(frames [B, T, H, W, 3]) -> [B, T, H, W]``.
    """
    config, info = read_config(path)
    graphdef, abstract = abstract_model(config, dtype)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointFormatError(f"{path} has no params/ directory: the model directory is incomplete")
    # Every process reads the whole model onto its first local device, on its own: with
    # several processes, orbax would otherwise sync them and restore global arrays.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    # Version 1 stored each fused projection's parts merged into its last axis.
    fused = _fused_parameters(nnx.merge(graphdef, abstract)) if info.get("version", 1) < 2 else []
    shapes = {path: _at(target, path).shape for path in fused}
    for path in fused:
        want = _at(target, path)
        merged = (*want.shape[:-2], want.shape[-2] * want.shape[-1])
        _at(target, path[:-1])[path[-1]] = jax.ShapeDtypeStruct(merged, want.dtype, sharding=device)
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only("load")) as checkpointer:
            restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax raises many types for truncated or foreign trees
        raise CheckpointFormatError(f"cannot read the parameters in {params_dir}: {e}".splitlines()[0]) from e
    for path in fused:
        _at(restored, path[:-1])[path[-1]] = _at(restored, path).reshape(shapes[path])
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)
