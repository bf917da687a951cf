"""Full-size export check: a random-weight model exported to ONNX, run in onnxruntime against JAX.

Reports the export time, the model file size, the relative error of the exported
ONNX clip model against the float32 JAX model at a non-square size, and the steady
CPU milliseconds per frame and peak resident memory of onnxruntime and of two JAX
forwards of the clip: ``jax`` in chunks of frames through the per-frame parts (the
CPU default, ``default_chunk_bytes``) and ``jax_clip`` all frames at once (``graphs.clip_function``, what the
ONNX graph computes); each runs in a process of its own (peak RSS includes loading
the model); then the same errors and a NaN/inf check for the reduced-precision
StableHLO export.

    python scripts/export_check.py --encoder vits --height 280 --width 378 --precision fp16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vda_jax.checkpoint import CheckpointFormatError, read_config, save_model
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


# One side of the comparison in a fresh process: ``python -c _RUN SIDE MODEL FRAMES.npy OUT.npy REPEATS`` runs
# the clip once (kept in OUT.npy), then REPEATS times; prints seconds per clip and the process's peak RSS.
_RUN = """
import json, resource, sys, time
import numpy as np
side, model, frames, out, repeats = *sys.argv[1:5], int(sys.argv[5])
frames = np.load(frames)
if side == "onnx":
    import onnxruntime as ort
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    run = lambda: session.run(None, {"frames": frames})[0]
else:
    import jax
    from flax import nnx
    from vda_jax.checkpoint import load_checkpoint
    from vda_jax.export import graphs
    from vda_jax.models.vda import compute_model
    jax.config.update("jax_default_matmul_precision", "highest")
    loaded = load_checkpoint(model)
    if side == "jax_clip":
        fn = graphs.clip_function(loaded)
        run = lambda: np.asarray(fn(frames))
    else:  # in chunks of frames, the CPU default (vda_jax.models.vda.default_chunk_bytes)
        graphdef, params = nnx.split(compute_model(loaded, "fp32"))
        def forward(p, x):
            model = nnx.merge(graphdef, p)
            return model(x, model.frames_per_chunk(x.shape[2:4]))
        fn = jax.jit(forward)
        run = lambda: np.asarray(fn(params, frames))
np.save(out, run())
start = time.perf_counter()
for _ in range(repeats):
    run()
print(json.dumps({"seconds": (time.perf_counter() - start) / repeats,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run_side(side: str, model: str, workdir: str, repeats: int) -> tuple[np.ndarray, dict]:
    """Runs ``side`` ("jax", "jax_clip" or "onnx") on ``workdir/frames.npy`` in a child process:
    (depth, {"seconds": per clip, "peak_rss_mb": the child's peak})."""
    out = os.path.join(workdir, f"depth_{side}.npy")
    result = subprocess.run([sys.executable, "-c", _RUN, side, model, os.path.join(workdir, "frames.npy"), out,
                             str(repeats)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the {side} run failed:\n{result.stderr[-3000:]}")
    return np.load(out), json.loads(result.stdout.splitlines()[-1])


def _side_entry(stats: dict, frames: int) -> dict:
    return {"ms_per_frame": 1e3 * stats["seconds"] / frames, "peak_rss_mb": stats["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vits")
    parser.add_argument("--checkpoint", help="a model directory to export instead of --encoder's random weights")
    parser.add_argument("--height", type=int, default=280)
    parser.add_argument("--width", type=int, default=378)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16"),
                        help="the reduced precision checked (StableHLO)")
    parser.add_argument("--repeats", type=int, default=2, help="timed clips per side (after one untimed)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.checkpoint:
        try:
            read_config(args.checkpoint)  # before anything is written or run
        except CheckpointFormatError as e:
            parser.error(str(e))
    jax.config.update("jax_default_matmul_precision", "highest")
    workdir = args.workdir or tempfile.mkdtemp(prefix="vda-export-check-")
    os.makedirs(workdir, exist_ok=True)
    checkpoint = args.checkpoint
    if not checkpoint:
        model = VideoDepthAnything(model_config(args.encoder), rngs=nnx.Rngs(0))
        _randomise_temporal(model, 0)
        checkpoint = os.path.join(workdir, "model")
        save_model(model, checkpoint, metadata={"input_size": args.height}, overwrite=True)

    frames = np.random.default_rng(0).normal(size=(1, args.frames, args.height, args.width, 3)).astype(np.float32)
    np.save(os.path.join(workdir, "frames.npy"), frames)
    expected, jax_stats = _run_side("jax", checkpoint, workdir, args.repeats)
    clip_depth, clip_stats = _run_side("jax_clip", checkpoint, workdir, args.repeats)
    report = {"encoder": args.encoder, "checkpoint": args.checkpoint, "size": [args.height, args.width],
              "frames": args.frames, "jax": _side_entry(jax_stats, args.frames),
              "jax_clip": {**_side_entry(clip_stats, args.frames), **_errors(clip_depth, expected)}}
    path = os.path.join(workdir, "clip.onnx")
    start = time.perf_counter()
    export_checkpoint(checkpoint, path, ExportOptions(height=args.height, width=args.width, frames=args.frames),
                      overwrite=True)
    entry = {"export_s": time.perf_counter() - start, "file_mb": os.path.getsize(path) / 2**20}
    depth, ort_stats = _run_side("onnx", path, workdir, args.repeats)
    entry.update(_errors(depth, expected))
    entry.update(_side_entry(ort_stats, args.frames))
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
