"""Full-size export check: a random-weight model exported to ONNX, run in onnxruntime against JAX.

Reports the export time, the model file size, the relative error of the exported
ONNX clip model against the float32 JAX model at a non-square size and CPU
milliseconds per frame of onnxruntime and of the JAX clip forward; then the same
errors and a NaN/inf check for the reduced-precision StableHLO export.

    python scripts/export_check.py --encoder vits --height 280 --width 378 --precision fp16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
from flax import nnx

from vda_jax.checkpoint import load_checkpoint, save_model
from vda_jax.config import model_config
from vda_jax.export.exporter import ExportOptions, export_checkpoint
from vda_jax.models.vda import VideoDepthAnything


def _randomise_temporal(model: VideoDepthAnything, seed: int) -> None:
    """Non-zero temporal output projections, so that the temporal layers matter (they start at zero)."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if "proj_out" in map(str, path) and path[-1] == "kernel":
            shape = variable.get_value().shape
            variable.set_value(jnp.asarray(rng.normal(0, shape[0] ** -0.5, shape), jnp.float32))


def _errors(depth: np.ndarray, expected: np.ndarray) -> dict:
    return {"finite": bool(np.isfinite(depth).all()),
            "max_rel_error": float(np.abs(depth - expected).max() / np.abs(expected).max()),
            "mean_rel_error": float(np.abs(depth - expected).mean() / np.abs(expected).mean())}


def _timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vits")
    parser.add_argument("--checkpoint", help="a model directory to export instead of --encoder's random weights")
    parser.add_argument("--height", type=int, default=280)
    parser.add_argument("--width", type=int, default=378)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--precision", default="fp16", help="the reduced precision checked (StableHLO)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    workdir = args.workdir or tempfile.mkdtemp(prefix="vda-export-check-")
    if args.checkpoint:
        model, checkpoint = load_checkpoint(args.checkpoint), args.checkpoint
    else:
        model = VideoDepthAnything(model_config(args.encoder), rngs=nnx.Rngs(0))
        _randomise_temporal(model, 0)
        checkpoint = os.path.join(workdir, "model")
        save_model(model, checkpoint, metadata={"input_size": args.height}, overwrite=True)

    frames = np.random.default_rng(0).normal(size=(1, args.frames, args.height, args.width, 3)).astype(np.float32)
    graphdef, params = nnx.split(model)
    chunk = 1  # one frame at a time, the CPU default (vda_jax.models.vda.default_chunk_bytes)
    jax_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, frames_per_chunk=chunk))
    expected = np.asarray(jax_fn(params, frames))
    report = {"encoder": args.encoder, "checkpoint": args.checkpoint, "size": [args.height, args.width],
              "frames": args.frames,
              "jax_ms_per_frame": 1e3 * _timed(lambda: jax_fn(params, frames).block_until_ready(), args.repeats)
              / args.frames}
    path = os.path.join(workdir, "clip.onnx")
    start = time.perf_counter()
    export_checkpoint(checkpoint, path, ExportOptions(height=args.height, width=args.width, frames=args.frames),
                      overwrite=True)
    entry = {"export_s": time.perf_counter() - start, "file_mb": os.path.getsize(path) / 2**20}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (depth,) = session.run(None, {"frames": frames})
    entry.update(_errors(depth, expected))
    entry["ort_ms_per_frame"] = 1e3 * _timed(lambda: session.run(None, {"frames": frames}), args.repeats) / args.frames
    report["onnx_fp32"] = entry
    print(json.dumps(report), flush=True)
    # Reduced precision: ONNX export is float32 only (see ExportOptions.check); the StableHLO artefact runs here.
    path = os.path.join(workdir, f"clip_{args.precision}.stablehlo")
    start = time.perf_counter()
    export_checkpoint(checkpoint, path, ExportOptions(format="stablehlo", height=args.height, width=args.width,
                                                      frames=args.frames, precision=args.precision), overwrite=True)
    entry = {"export_s": time.perf_counter() - start, "file_mb": os.path.getsize(path) / 2**20}
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    entry.update(_errors(np.asarray(exported.call(frames)), expected))
    report[f"stablehlo_{args.precision}"] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
