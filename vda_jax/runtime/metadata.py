"""The JSON beside an exported model: where it lives, its versions, and reading it back (NumPy-free, JAX-free).

``vda-jax export`` writes ``OUT.onnx.json`` beside ``OUT.onnx`` (``OUT.stablehlo.json``
beside ``OUT.stablehlo``), so two artefacts of one stem never share a description.

Versions:
  1. ``OUT.json`` beside ``OUT.onnx`` / ``OUT.stablehlo``; the streaming graph carried 8
     rings of normalised hidden states. Still readable: the JSON is looked for under the
     old name, and the runtime passes the rings through whatever they hold.
  2. ``OUT.onnx.json``; the streaming graph carries 16 rings of projected keys and values
     (``ring_0..ring_15``); the output's batch axis is named ``B`` like the input's.
"""

from __future__ import annotations

import os
from typing import Any

from vda_jax.io.json_file import read_json

EXPORT_FORMAT = "vda-jax-export"
EXPORT_VERSION = 2
ARTIFACT_SUFFIXES = {"onnx": ".onnx", "stablehlo": ".stablehlo"}


def metadata_path(path: str) -> str:
    """The JSON describing the exported model at ``path`` (``OUT.onnx`` -> ``OUT.onnx.json``)."""
    return f"{path}.json"


def read_metadata(path: str, artifact: str) -> dict[str, Any]:
    """The metadata of the ``artifact`` ("onnx" or "stablehlo") export at ``path``.

    Raises:
      FileNotFoundError: the model or its JSON is missing.
      ValueError: the JSON is not a vda-jax export of that kind, or is from a newer vda-jax.
    """
    name, suffix = os.path.basename(path), ARTIFACT_SUFFIXES[artifact]
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the {suffix} file that `vda-jax export` wrote (a model "
                         "directory goes to --checkpoint)")
    if not path.endswith(suffix):
        raise ValueError(f"{path} is not a {suffix} file; give the {suffix} file that `vda-jax export` wrote")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; write it with `vda-jax export CHECKPOINT {name}`")
    candidates = [metadata_path(path), os.path.splitext(path)[0] + ".json"]  # version 2, version 1
    meta_path = next((p for p in candidates if os.path.isfile(p)), None)
    if meta_path is None:
        raise FileNotFoundError(f"{path} has no {os.path.basename(candidates[0])} beside it; export it again with "
                                f"`vda-jax export CHECKPOINT {name}` (it writes both)")
    meta = read_json(meta_path, f"export {name} again")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path} does not describe a vda-jax export; export {name} again")
    if not isinstance(meta.get("version"), int) or meta["version"] > EXPORT_VERSION:
        raise ValueError(f"{meta_path} is export version {meta.get('version')!r}, newer than this vda-jax reads "
                         f"({EXPORT_VERSION}); upgrade vda-jax")
    if meta.get("artifact") != artifact:
        raise ValueError(f"{meta_path} describes a {meta.get('artifact')} export, not {name}; export {name} again "
                         "(version 1 exports of one file stem shared their JSON)")
    return meta
