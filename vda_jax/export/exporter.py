"""``vda-jax export``: a model directory -> an ONNX or StableHLO artefact (+ JSON), or an official checkpoint.

Beside ``OUT.onnx`` / ``OUT.stablehlo`` goes ``OUT.onnx.json`` / ``OUT.stablehlo.json``
(``runtime.metadata``), everything a runtime needs besides the graph: input and output
names, shapes and dtypes, the network input size, the normalisation, relative or metric
depth and the source checkpoint's hash. Files appear atomically: a failed export leaves
nothing.

StableHLO calling convention: ``jax.export.deserialize(bytearray(data))`` gives an
``Exported`` whose ``.call(*inputs)`` takes the inputs in the JSON's order (the
clip: ``frames``; the stream: ``frame, step, ring_0 .. ring_15``) and returns the
outputs in its order; the parameters are constants inside the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vda_jax import interrupts
from vda_jax.checkpoint import load_checkpoint, read_config
from vda_jax.config import IMAGENET_MEAN, IMAGENET_STD
from vda_jax.export import graphs
from vda_jax.export.official import write_official
from vda_jax.inference import schedule, sizing, stream
from vda_jax.io.paths import check_output_file
from vda_jax.io.video import AtomicPath
from vda_jax.models.vda import VideoDepthAnything, with_options
from vda_jax.runtime.metadata import ARTIFACT_SUFFIXES, EXPORT_FORMAT, EXPORT_VERSION, metadata_path

FORMATS = ("onnx", "stablehlo", "official")
PRECISIONS = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}
OFFICIAL_SUFFIXES = (".pth", ".safetensors")
_ONNX_INLINE_LIMIT = 1_800_000_000  # bytes of weights kept inside the .onnx file (protobuf stops at 2 GiB)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What ``vda-jax export`` writes (see its ``--help``)."""

    format: str = "onnx"
    frames: int = schedule.WINDOW_FRAMES
    height: int | None = None
    width: int | None = None
    precision: str = "fp32"
    streaming: bool = False

    def check(self, config_frames: int) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if (self.height is None) != (self.width is None):
            raise ValueError("give both --height and --width (or neither, for a square input)")
        for name, size in (("height", self.height), ("width", self.width)):
            if size is not None and (size < sizing.MULTIPLE or size % sizing.MULTIPLE):
                raise ValueError(f"--{name} {size} must be a positive multiple of {sizing.MULTIPLE}")
        if self.format == "onnx" and self.precision != "fp32":
            # jax2onnx 0.17.1's Flax layer plugins ignore the layers' compute dtype and mix float16 and float32.
            raise ValueError(f"ONNX export is float32 only; build a {self.precision} engine from it "
                             "(trtexec --fp16) or use --format stablehlo")
        if self.format == "official" and (self.streaming or self.precision != "fp32" or self.height
                                          or self.frames != schedule.WINDOW_FRAMES):
            raise ValueError("--format official writes the float32 parameters only; drop --streaming, "
                             "--frames, --precision, --height and --width")
        if self.streaming and self.frames != schedule.WINDOW_FRAMES:
            raise ValueError("--frames sets the clip model's length; a streaming model takes one frame at a time: "
                             "drop --frames")
        if not 1 <= self.frames <= config_frames:
            raise ValueError(f"--frames {self.frames} must be between 1 and the model's {config_frames}")


def check_output(output: str, options: ExportOptions, *, overwrite: bool = False) -> None:
    """Raises ``ValueError`` (``FileExistsError``) unless ``output`` can take the export
    ``options`` describe: a name of its format, a place to write it, the modules it needs."""
    by_format = {**{f: (suffix,) for f, suffix in ARTIFACT_SUFFIXES.items()}, "official": OFFICIAL_SUFFIXES}
    other = next((f for f, suffixes in by_format.items() if f != options.format and output.endswith(suffixes)), None)
    if other:
        raise ValueError(f"--format {options.format} output {output} is named like a --format {other} file; pass "
                         f"--format {other}, or end the name in {' or '.join(by_format[options.format])}")
    check_output_file(output, f"--format {options.format} output", suffixes=by_format[options.format],
                      overwrite=overwrite)
    if options.format == "onnx":
        _onnx_modules()  # missing: said now, not after loading and tracing the model


def export_checkpoint(checkpoint: str, output: str, options: ExportOptions, *,
                      overwrite: bool = False) -> dict[str, Any]:
    """Exports a model directory; returns the metadata written beside it (empty for ``official``)."""
    config, info = read_config(checkpoint)
    options.check(config.num_frames)
    check_output(output, options, overwrite=overwrite)
    model = load_checkpoint(checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if options.format == "official":
        with AtomicPath(output) as tmp:
            write_official(model, tmp)
        return {}
    input_size = int(info.get("input_size", 518))
    net_size = (options.height, options.width) if options.height else (input_size,) * 2
    model = with_options(model, dtype=PRECISIONS[options.precision])
    if options.streaming:
        fn, specs = graphs.stream_function(model, net_size), graphs.stream_specs(model, net_size)
        names = ("frame", "step", *(f"ring_{i}" for i in range(len(specs) - 2)))
        out_names = ("depth", "next_step", *(f"next_{n}" for n in names[2:]))
    else:
        fn = graphs.clip_function(model)
        specs = (jax.ShapeDtypeStruct((1, options.frames, *net_size, 3), jnp.float32),)
        names, out_names = ("frames",), ("depth",)
    outputs = jax.eval_shape(fn, *specs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    metadata = _metadata(model, checkpoint, options, net_size, zip(names, specs), zip(out_names, outputs))
    # Everything is written in a staging folder beside the output, then moved into place: a failed export
    # leaves nothing, and the artifact (moved last) never names a weights file that is not there yet.
    folder, name = os.path.split(os.path.abspath(output))
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}.") as staging:
        if options.format == "onnx":
            files = _write_onnx(fn, specs, names, out_names, dynamic_batch=not options.streaming, folder=staging,
                                name=name)
        else:
            files = _write_stablehlo(fn, specs, dynamic_batch=not options.streaming, path=os.path.join(staging, name))
        description = metadata_path(name)
        with open(os.path.join(staging, description), "w") as f:
            json.dump(metadata, f, indent=2)
        with interrupts.held():  # all or none
            for file in (*files[1:], description, files[0]):
                os.replace(os.path.join(staging, file), os.path.join(folder, file))
    return metadata


def _onnx_modules():
    """``(onnx, jax2onnx.to_onnx)``, or ValueError with the install command."""
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ValueError(f"ONNX export needs jax2onnx ({e}); install it with pip install 'vda-jax[onnx]'") from e
    return onnx, to_onnx


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Drops ``logger``'s messages below ERROR in the block (onnx_ir warns once per untyped shape constant)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _write_onnx(fn, specs, names, out_names, *, dynamic_batch: bool, folder: str, name: str) -> list[str]:
    """Writes the ONNX model ``folder/name``; returns the names of the files written, the model's first.

    One self-contained file, unless the weights pass protobuf's 2 GB limit (vitg): then they go
    to ``name.data`` beside it, which the model names.
    """
    onnx, to_onnx = _onnx_modules()
    inputs = [("B", *s.shape[1:]) if dynamic_batch and i == 0 else s for i, s in enumerate(specs)]
    with _quiet("onnx_ir"):
        proto = to_onnx(fn, inputs, model_name="video_depth_anything", input_names=list(names),
                        output_names=list(out_names))
    if dynamic_batch:
        _name_output_batch_axes(proto.graph, "B")
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > _ONNX_INLINE_LIMIT
    onnx.save_model(proto, os.path.join(folder, name), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=name + ".data")
    return [name, name + ".data"] if external else [name]


def _name_output_batch_axes(graph, name: str) -> None:
    """Renames the symbol jax2onnx gave the outputs' batch axis (``dynamic_25``) to the input's, everywhere."""
    for output in graph.output:
        symbol = output.type.tensor_type.shape.dim[0].dim_param
        if symbol and symbol != name:
            for value in (*graph.value_info, *graph.output):
                for dim in value.type.tensor_type.shape.dim:
                    if dim.dim_param == symbol:
                        dim.dim_param = name


def _write_stablehlo(fn, specs, *, dynamic_batch: bool, path: str) -> list[str]:
    """Writes the serialized ``jax.export`` at ``path``; returns its file name."""
    if dynamic_batch:
        (batch,) = jax.export.symbolic_shape("B")
        specs = (jax.ShapeDtypeStruct((batch, *specs[0].shape[1:]), specs[0].dtype), *specs[1:])
    exported = jax.export.export(fn)(*specs)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return [os.path.basename(path)]


def _metadata(model: VideoDepthAnything, checkpoint: str, options: ExportOptions, net_size: tuple[int, int],
              inputs, outputs) -> dict[str, Any]:
    def spec(name, s, batch):
        shape = ["batch" if batch and i == 0 else int(d) for i, d in enumerate(s.shape)]
        return {"name": name, "shape": shape, "dtype": np.dtype(s.dtype).name}

    batch = not options.streaming
    meta = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "artifact": options.format,
        "kind": "stream" if options.streaming else "clip",
        "inputs": [spec(n, s, batch) for n, s in inputs], "outputs": [spec(n, s, batch) for n, s in outputs],
        "network_size": list(net_size), "input_size": min(net_size), "patch_size": model.config.patch_size,
        "normalisation": {"layout": "RGB, channels last", "scale": 1 / 255,
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "depth": "metric" if model.config.metric else "relative",
        "precision": options.precision, "encoder": model.config.name,
        "source_checkpoint": {"path": os.path.abspath(checkpoint), "sha256": checkpoint_hash(checkpoint)},
    }
    if options.streaming:
        meta["stream"] = {"ring_slots": stream.RING_SLOTS, "key_gap": stream.KEY_GAP,
                          "context_frames": stream.CONTEXT_FRAMES}
    else:
        meta["window"] = {"frames": options.frames, "overlap": schedule.OVERLAP_FRAMES,
                          "keyframes": list(schedule.KEYFRAMES), "interpolation": schedule.INTERP_FRAMES}
    return meta


def checkpoint_hash(path: str) -> str:
    """SHA-256 over a model directory's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
