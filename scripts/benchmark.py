"""Speed and memory of the long-video inference (not a test).

Reports, for a model with random weights of a released size (default vits) at
one input size: the compile time of the window step, ms per frame of the
steady-state step, end-to-end frames/s on a generated video (frames made on the
fly, depths discarded), and peak RSS for several video lengths, each measured
in a fresh process. With ``--official REPO --torch-python PY`` the official
PyTorch pipeline is timed on the same generated frames (it must hold them all).

  python scripts/benchmark.py --encoder vits --input-size 280 --frames 300 --rss-frames 300 3000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def generated_frames(count: int, height: int, width: int):
    """A moving, textured test video, frame by frame (uint8 ``[H, W, 3]``)."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    for t in range(count):
        phase = 0.05 * t
        r = 128 + 100 * np.sin(x / 23.0 + phase) * np.cos(y / 31.0)
        g = 128 + 100 * np.sin((x + y) / 41.0 - 2 * phase)
        cx, cy = width * (0.5 + 0.3 * np.sin(phase)), height * 0.5
        disc = ((x - cx) ** 2 + (y - cy) ** 2) < (0.15 * height) ** 2
        b = np.where(disc, 230.0, 60 + 40 * np.cos(y / 17.0 + phase))
        yield np.stack([r, g, b], axis=-1).astype(np.uint8)


class _NullSink:
    def __init__(self):
        self.frames = 0

    def write(self, depth):
        self.frames += len(depth)

    def close(self):
        pass


def _model(encoder: str, precision: str):
    import jax.numpy as jnp
    from flax import nnx

    from vda_jax.config import model_config
    from vda_jax.models.vda import VideoDepthAnything

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    return VideoDepthAnything(model_config(encoder), rngs=nnx.Rngs(0), dtype=dtype)


def measure_step(args) -> dict:
    """Compile time and steady-state ms/frame of the window step."""
    import jax

    from vda_jax.inference import window
    from vda_jax.inference.preprocess import network_size
    from vda_jax.inference.video import WindowRunner

    model = _model(args.encoder, args.precision)
    frame_size = (args.height, args.width)
    frames = np.stack(list(generated_frames(window.STRIDE, *frame_size)))[None]
    first = np.array([False])
    t0 = time.perf_counter()
    runner = WindowRunner(model, frame_size, network_size(frame_size, args.input_size), slots=1)
    runner.start(0, frames[0, :window.OVERLAP_FRAMES])
    jax.block_until_ready(runner.step(frames, first))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(runner.step(frames, first))
        times.append(time.perf_counter() - t)
    return {"compile_and_first_step_s": round(compile_s, 2), "net_size": list(runner.net_size),
            "step_ms_per_frame": round(1000 * float(np.median(times)) / window.STRIDE, 2)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def measure_video(args, frames: int) -> dict:
    """End-to-end frames/s (after a short warm-up video compiles the step) and peak RSS."""
    from vda_jax.inference.video import VideoJob, run_videos

    model = _model(args.encoder, args.precision)
    frame_size = (args.height, args.width)

    def run(count: int) -> float:
        sink = _NullSink()
        start = time.perf_counter()
        run_videos(model, frame_size, [VideoJob(generated_frames(count, *frame_size), sink)],
                   input_size=args.input_size, precision=args.precision)
        assert sink.frames == count
        return time.perf_counter() - start

    warmup = run(30)
    seconds = run(frames)
    return {"frames": frames, "seconds": round(seconds, 2), "fps": round(frames / seconds, 2),
            "warmup_30_frames_with_compile_s": round(warmup, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}


def measure_official(args) -> dict:
    """The official pipeline on the same frames, run by a Python that has torch."""
    code = f"""
import sys, time, types, json, numpy as np, torch
sys.path.insert(0, {args.official!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
tv = types.ModuleType('torchvision'); tr = types.ModuleType('torchvision.transforms')
class Compose:
    def __init__(self, transforms): self.transforms = transforms
    def __call__(self, sample):
        for t in self.transforms: sample = t(sample)
        return sample
tr.Compose = Compose; tv.transforms = tr
sys.modules['torchvision'] = tv; sys.modules['torchvision.transforms'] = tr
from benchmark import generated_frames, peak_rss_mb
from video_depth_anything.video_depth import VideoDepthAnything
cfg = dict(vits=dict(features=64, out_channels=[48, 96, 192, 384]),
           vitb=dict(features=128, out_channels=[96, 192, 384, 768]),
           vitl=dict(features=256, out_channels=[256, 512, 1024, 1024]))[{args.encoder!r}]
torch.manual_seed(0)
model = VideoDepthAnything(encoder={args.encoder!r}, **cfg).eval()
frames = np.stack(list(generated_frames({args.frames}, {args.height}, {args.width})))
t = time.perf_counter()
depth, _ = model.infer_video_depth(frames, 30, input_size={args.input_size}, device='cpu', fp32=True)
s = time.perf_counter() - t
print(json.dumps(dict(frames=len(depth), seconds=round(s, 2), fps=round(len(depth) / s, 2),
                      peak_rss_mb=peak_rss_mb(),
                      torch_threads=torch.get_num_threads())))
"""
    out = subprocess.run([args.torch_python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(args, mode: str, frames: int) -> dict:
    """Runs one measurement in a fresh process, so each starts from the same memory and compile state."""
    cmd = [sys.executable, __file__, "--only", mode, "--frames", str(frames), "--repeats", str(args.repeats)] + [
        a for k in ("encoder", "input_size", "height", "width", "precision")
        for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vits", choices=("vits", "vitb", "vitl"))
    parser.add_argument("--input-size", type=int, default=280)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--frames", type=int, default=300, help="length of the end-to-end video")
    parser.add_argument("--rss-frames", type=int, nargs="*", default=[300, 3000],
                        help="video lengths whose peak RSS is measured (each in a fresh process)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", help="path to the official Video-Depth-Anything checkout")
    parser.add_argument("--torch-python", help="a Python with torch and cv2 for --official")
    parser.add_argument("--only", choices=("step", "video"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:  # a child process of main()
        print(json.dumps(measure_step(args) if args.only == "step" else measure_video(args, args.frames)))
        return
    report = {"encoder": args.encoder, "input_size": args.input_size, "frame_size": [args.height, args.width],
              "precision": args.precision, "step": _child(args, "step", 0)}
    print(json.dumps(report["step"]), flush=True)
    for frames in sorted({args.frames, *args.rss_frames}):
        report[f"video_{frames}"] = _child(args, "video", frames)
        print(json.dumps(report[f"video_{frames}"]), flush=True)
    if args.official:
        report["official"] = measure_official(args)
        print(json.dumps(report["official"]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
