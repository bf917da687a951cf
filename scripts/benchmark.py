"""Speed and memory of the long-video inference (not a test).

Reports, for a model with random weights of a released size (default vits) at
one input size: the compile time of the window step, ms per frame of the
steady-state step, end-to-end frames/s on a generated video (frames made on the
fly, depths discarded), and peak RSS for several video lengths, each measured
in a fresh process. With ``--official REPO --torch-python PY`` the official
PyTorch pipeline is timed on the same generated frames (it must hold them all).

  python scripts/benchmark.py --encoder vits --input-size 280 --frames 300 --rss-frames 300 3000

``--clip VIDEO`` runs a real file end to end the way the official ``run.py`` does
(read, infer, write the source and depth videos), with the same random weights on
both sides (the official model's, converted), and reports for each: the first call
in a fresh process, a second fresh process (ours: warm compilation cache), the
steady frames/s of a repeated call, the time of each stage, and the largest
difference of the depths. ``--streaming`` does the same for the streaming modes
(per-frame latency).

  python scripts/benchmark.py --clip davis.mp4 --input-size 140 --official REPO --torch-python PY
  python scripts/benchmark.py --clip davis.mp4 --input-size 140 --streaming --official REPO --torch-python PY
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from vda_jax.io.video import X264_PRESETS


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


def _model(args):
    """``args.checkpoint``'s model, or random weights of the released size ``args.encoder``."""
    import jax.numpy as jnp
    from flax import nnx

    from vda_jax.checkpoint import load_checkpoint
    from vda_jax.config import model_config
    from vda_jax.models.vda import VideoDepthAnything

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.precision]
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, dtype=dtype)
    return VideoDepthAnything(model_config(args.encoder), rngs=nnx.Rngs(0), dtype=dtype)


def measure_step(args) -> dict:
    """Compile time and steady-state ms/frame of the window step."""
    import jax

    from vda_jax.inference import window
    from vda_jax.inference.preprocess import network_size
    from vda_jax.inference.video import WindowRunner

    model = _model(args)
    frame_size = (args.height, args.width)
    frames = np.stack(list(generated_frames(window.WINDOW_FRAMES, *frame_size)))[None]
    first, real = np.array([False]), np.array([window.WINDOW_FRAMES], np.int32)  # a later window: 22 new frames
    t0 = time.perf_counter()
    runner = WindowRunner(model, frame_size, network_size(frame_size, args.input_size), slots=1)
    jax.block_until_ready(runner.step(frames, first, real))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(runner.step(frames, first, real))
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

    model = _model(args)
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


_TORCHVISION_STUB = """
import sys, types
tv = types.ModuleType('torchvision'); tr = types.ModuleType('torchvision.transforms')
class Compose:
    def __init__(self, transforms): self.transforms = transforms
    def __call__(self, sample):
        for t in self.transforms: sample = t(sample)
        return sample
tr.Compose = Compose; tv.transforms = tr
sys.modules['torchvision'] = tv; sys.modules['torchvision.transforms'] = tr
"""


def measure_official(args) -> dict:
    """The official pipeline on the same frames, run by a Python that has torch."""
    code = _TORCHVISION_STUB + f"""
import sys, time, json, numpy as np, torch
sys.path.insert(0, {args.official!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
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


_OFFICIAL_CLIP = """
import json, os, sys, time, numpy as np, torch
sys.path.insert(0, {official!r})
from utils.dc_utils import read_video_frames, save_video
from video_depth_anything.video_depth import VideoDepthAnything
from video_depth_anything.video_depth_stream import VideoDepthAnything as StreamingModel
cfg = dict(vits=dict(features=64, out_channels=[48, 96, 192, 384]),
           vitb=dict(features=128, out_channels=[96, 192, 384, 768]),
           vitl=dict(features=256, out_channels=[256, 512, 1024, 1024]))[{encoder!r}]
torch.manual_seed(0)
model = (StreamingModel if {streaming!r} else VideoDepthAnything)(encoder={encoder!r}, **cfg).eval()
if not os.path.exists({weights!r}):
    torch.save(model.state_dict(), {weights!r})

loaded = np.load({frames_path!r}) if {frames_path!r} else None  # in memory: read before any timing

def clip():
    t0 = time.perf_counter()
    frames, fps = (loaded, 30.0) if loaded is not None else read_video_frames({clip!r}, {max_len!r}, -1, 1280)
    t1 = time.perf_counter()
    if {streaming!r}:
        model.transform = None; model.frame_cache_list = []; model.frame_id_list = []; model.id = -1
        latency, depths = [], []
        for frame in frames:
            t = time.perf_counter()
            depths.append(model.infer_video_depth_one(frame, input_size={input_size!r}, device='cpu', fp32=True))
            latency.append(time.perf_counter() - t)
        depths = np.stack(depths)
    else:
        depths, fps = model.infer_video_depth(frames, fps, input_size={input_size!r}, device='cpu', fp32=True)
        latency = []
    t2 = time.perf_counter()
    if loaded is None:
        save_video(frames, os.path.join({out!r}, 'src.mp4'), fps=fps)
        save_video(depths, os.path.join({out!r}, 'vis.mp4'), fps=fps, is_depths=True)
    t3 = time.perf_counter()
    return depths, dict(seconds=t3 - t0, read_s=t1 - t0, infer_s=t2 - t1, write_s=t3 - t2, frames=len(depths),
                        latency_ms=1000 * float(np.median(latency[2:])) if latency else None)

depths, first = clip()
np.save({depths_path!r}, depths.astype(np.float32))
_, again = clip()
print(json.dumps(dict(first_call=first, steady=again, torch_threads=torch.get_num_threads())))
"""


def official_clip(args, weights: str, depths_path: str, frames_path: str | None) -> dict:
    """The official pipeline on ``args.clip`` in a fresh process: first and repeated call, per stage.

    ``frames_path``: the clip's frames (``.npy``), loaded before the timing, and no videos written.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        code = _TORCHVISION_STUB + _OFFICIAL_CLIP.format(
            official=os.path.abspath(args.official), encoder=args.encoder, streaming=args.streaming, weights=weights,
            clip=os.path.abspath(args.clip), max_len=args.max_len, input_size=args.input_size, out=out,
            depths_path=depths_path, frames_path=frames_path)
        run = subprocess.run([args.torch_python, "-c", code], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"the official pipeline failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


class _Stages:
    """Wall time spent in the pipeline's stages (they overlap: decoding runs in its own thread)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def timed_iter(self, name: str, iterable):
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            yield item


def measure_clip(args) -> dict:
    """Ours on ``args.clip`` as ``vda-jax infer`` runs it (a child process): first and repeated call, per stage.

    Stages: decode (the decoder, in the decode thread), src_encode (the source video, same
    thread), device_wait (the main thread waiting for depths: compute not hidden behind the
    host), depth_write (colour map and encoding of the depth video, in the background thread that
    finishes a video), rest (dispatch, copies).
    """
    import tempfile

    from vda_jax.convert.convert import convert_state_dict
    from vda_jax.convert.readers import read_checkpoint

    from vda_jax.config import model_config
    from vda_jax.inference import files, video
    from vda_jax.io import video as io_video

    stages = _Stages()
    read_frames = io_video.read_frames
    files.read_frames = lambda *a, **k: stages.timed_iter("decode", read_frames(*a, **k))
    files.VideoWriter.write = stages.timed("src_encode", files.VideoWriter.write)
    write = files.VideoOutputs.write

    def keep_and_write(self, depth):
        depths.append(np.array(depth))  # untimed: only for the comparison with the official depths
        stages.seconds["depth_write"] = stages.seconds.get("depth_write", 0.0) - time.perf_counter()
        write(self, depth)
        stages.seconds["depth_write"] += time.perf_counter()

    files.VideoOutputs.write = keep_and_write
    files.VideoOutputs.finish = stages.timed("depth_write", files.VideoOutputs.finish)  # in its own thread
    collect = video._collect

    def timed_collect(out, info, on_frames):
        start = time.perf_counter()
        out.block_until_ready()
        stages.seconds["device_wait"] = stages.seconds.get("device_wait", 0.0) + time.perf_counter() - start
        return collect(out, info, on_frames)

    video._collect = timed_collect
    model = convert_state_dict(read_checkpoint(args.weights), model_config(args.encoder))
    depths = []
    def clip() -> dict:
        stages.seconds.clear()
        depths.clear()
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            report = files.infer_files(model, [args.clip], files.OutputOptions(out, video_preset=args.video_preset),
                                       files.ReadOptions(max_len=args.max_len), input_size=args.input_size,
                                       precision="fp32", progress=False, streaming=args.streaming)
            seconds = time.perf_counter() - start
            assert report.written == [args.clip], report
        timing = {"seconds": seconds, "frames": sum(map(len, depths)),
                  **{k: round(v, 3) for k, v in stages.seconds.items()}}
        timing["rest"] = round(seconds - sum(stages.seconds.get(k, 0.0) for k in ("device_wait", "depth_write")), 3)
        return timing

    first = clip()
    result = {"first_call": first}
    if args.depths:
        expected = np.load(args.depths)
        ours = np.concatenate([d.reshape(-1, *d.shape[-2:]) for d in depths])
        result["max_rel_diff_vs_official"] = float(np.abs(ours - expected).max() / np.abs(expected).max())
    if args.streaming:
        from vda_jax.inference import stream

        latencies = []
        stream_step = stream.StreamingDepth.step

        def timed_step(self, frame):
            start = time.perf_counter()
            try:
                return stream_step(self, frame)
            finally:
                latencies.append(time.perf_counter() - start)

        stream.StreamingDepth.step = timed_step
    result["steady"] = clip()
    if args.streaming:
        result["steady"]["latency_ms"] = 1000 * float(np.median(latencies[2:]))
    return result


def measure_memory(args) -> dict:
    """Ours on frames already in memory (a child process): the library call, first and repeated.

    ``infer_video_depth`` (or, with ``--streaming``, ``StreamingDepth.step`` frame by frame) on
    the frames ``args.frames_path`` holds, loaded before the timing, with the official model's
    weights ``args.weights``.
    """
    from vda_jax.convert.convert import convert_state_dict
    from vda_jax.convert.readers import read_checkpoint

    import vda_jax
    from vda_jax.config import model_config

    model = convert_state_dict(read_checkpoint(args.weights), model_config(args.encoder))
    frames = np.load(args.frames_path)

    def call() -> tuple[np.ndarray, dict]:
        start = time.perf_counter()
        if args.streaming:
            stream, latency, depths = vda_jax.StreamingDepth(model, args.input_size, "fp32"), [], []
            for frame in frames:
                t = time.perf_counter()
                depths.append(stream.step(frame))
                latency.append(time.perf_counter() - t)
            depths = np.stack(depths)
        else:
            depths = vda_jax.infer_video_depth(model, frames, input_size=args.input_size, precision="fp32")
        timing = {"seconds": time.perf_counter() - start, "frames": len(depths)}
        if args.streaming:
            timing["latency_ms"] = 1000 * float(np.median(latency[2:]))
        return depths, timing

    depths, first = call()
    result = {"first_call": first}
    if args.depths:
        expected = np.load(args.depths)
        result["max_rel_diff_vs_official"] = float(np.abs(depths - expected).max() / np.abs(expected).max())
    result["steady"] = call()[1]
    return result


def clip_report(args) -> dict:
    """Ours (a cold and a warm fresh process) against the official pipeline (a fresh process) on one clip."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights, depths_path = os.path.join(tmp, "weights.pth"), os.path.join(tmp, "official_depths.npy")
        frames_path = None
        if args.in_memory:  # both sides get the same decoded frames
            from vda_jax.io.video import read_frames

            frames_path = os.path.join(tmp, "frames.npy")
            np.save(frames_path, np.stack(list(read_frames(args.clip, max_res=1280, max_len=args.max_len))))
        report = {"clip": args.clip, "encoder": args.encoder, "input_size": args.input_size, "max_len": args.max_len,
                  "streaming": args.streaming, "in_memory": args.in_memory, "video_preset": args.video_preset,
                  "official": official_clip(args, weights, depths_path, frames_path)}
        print(json.dumps({"official": report["official"]}), flush=True)
        env = {**os.environ, "VDA_JAX_CACHE_DIR": os.path.join(tmp, "xla")}  # empty: the first process compiles
        for run in ("cold_process", "warm_process"):
            cmd = [sys.executable, __file__, "--only", "memory" if args.in_memory else "clip", "--clip", args.clip,
                   "--weights", weights, "--depths", depths_path, "--encoder", args.encoder,
                   "--input-size", str(args.input_size), "--max-len", str(args.max_len),
                   "--video-preset", args.video_preset] + (["--streaming"] if args.streaming else []) + (
                      ["--frames-path", frames_path] if frames_path else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(f"{run} failed:\n{out.stderr[-3000:]}")
            report[run] = json.loads(out.stdout.splitlines()[-1])
            print(json.dumps({run: report[run]}), flush=True)
    official, cold, warm = report["official"], report["cold_process"], report["warm_process"]
    report["speedup"] = {  # the whole call (--clip: read, infer, write); the official pipeline has nothing to compile
        "first_process": official["first_call"]["seconds"] / cold["first_call"]["seconds"],
        "second_process": official["first_call"]["seconds"] / warm["first_call"]["seconds"],
        "steady": official["steady"]["seconds"] / warm["steady"]["seconds"]}
    if args.streaming:
        report["speedup"]["steady_latency"] = official["steady"]["latency_ms"] / warm["steady"]["latency_ms"]
    return report


def _child(args, mode: str, frames: int) -> dict:
    """Runs one measurement in a fresh process, so each starts from the same memory and compile state."""
    cmd = [sys.executable, __file__, "--only", mode, "--frames", str(frames), "--repeats", str(args.repeats)] + [
        a for k in ("encoder", "input_size", "height", "width", "precision")
        for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the {mode} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vits", choices=("vits", "vitb", "vitl"))
    parser.add_argument("--checkpoint", help="a model directory to time instead of --encoder's random weights "
                                             "(not with --clip or --official, which convert the official model)")
    parser.add_argument("--input-size", type=int, default=280)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--frames", type=int, default=300, help="length of the end-to-end video")
    parser.add_argument("--rss-frames", type=int, nargs="*", default=[300, 3000],
                        help="video lengths whose peak RSS is measured (each in a fresh process)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", help="path to the official Video-Depth-Anything checkout")
    parser.add_argument("--torch-python", help="a Python with the official requirements for --official (torch, "
                        "cv2; for --clip without --in-memory, matplotlib < 3.9: the official save_video uses "
                        "matplotlib.cm.get_cmap)")
    parser.add_argument("--clip", help="a video file to run end to end against the official pipeline")
    parser.add_argument("--max-len", type=int, default=-1, help="--clip: frames to read (-1: all)")
    parser.add_argument("--streaming", action="store_true", help="--clip: the streaming modes")
    parser.add_argument("--video-preset", default="veryfast", choices=X264_PRESETS,
                        help="--clip: x264 preset of our mp4s (the official's are x264's default, medium)")
    parser.add_argument("--in-memory", action="store_true",
                        help="--clip: time the library call on the clip's frames already in memory (decoded "
                             "once, before any timing; no videos written)")
    parser.add_argument("--only", choices=("step", "video", "clip", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--frames-path", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--depths", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:  # a child process of main()
        measure = {"step": measure_step, "clip": measure_clip, "memory": measure_memory}.get(args.only)
        print(json.dumps(measure(args) if measure else measure_video(args, args.frames)))
        return
    if args.checkpoint and (args.clip or args.official):
        parser.error("--checkpoint times our model alone: drop --clip and --official, or drop --checkpoint")
    if args.checkpoint:
        from vda_jax.checkpoint import CheckpointFormatError, read_config

        try:
            read_config(args.checkpoint)  # before any child process starts
        except CheckpointFormatError as e:
            parser.error(str(e))
    if args.official and not args.torch_python:
        parser.error("--official runs in another Python: give --torch-python (one with torch and cv2)")
    if args.clip:
        if not args.official:
            parser.error("--clip compares with the official pipeline: give --official and --torch-python")
        print(json.dumps(clip_report(args), indent=2))
        return
    report = {"encoder": args.encoder, "checkpoint": args.checkpoint, "input_size": args.input_size,
              "frame_size": [args.height, args.width], "precision": args.precision, "step": _child(args, "step", 0)}
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
