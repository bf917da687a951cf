"""Throughput of the synthetic renderer and of the training input pipeline on this machine.

Renders videos at 128x128 and 256x256 (frames/s, one process, best of 3), writes a synthetic
TFDS dataset (4 videos of 40 frames at 294x392) to a temporary folder once, then times the grain
pipeline reading 32-frame clips cropped to 126x126 and to 518x518 (clips/s, after a warm-up
batch). Every size is an option.

    python scripts/benchmark_data.py [--workers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import grain

from vda_jax.data import builders
from vda_jax.data.pipeline import DataConfig, make_dataset
from vda_jax.data.synthetic import render_video


def render_fps(size: int, num_frames: int, seeds: range, repeats: int = 3) -> float:
    """Best of ``repeats`` timings (the machine may be shared) of rendering ``seeds`` videos."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for seed in seeds:
            render_video(seed, num_frames, size, size)
        best = min(best, time.perf_counter() - start)
    return len(seeds) * num_frames / best


def pipeline_clips_per_second(data_dir: str, clip_frames: int, crop: int, batches: int, threads: int) -> float:
    config = DataConfig(
        video_dataset="vda_synthetic/bench",
        data_dir=data_dir,
        clip_frames=clip_frames,
        crop_size=(crop, crop),
        batch_size=1,
        read_threads=threads,
        prefetch_batches=2 * threads,
    )
    iterator = iter(make_dataset(config, grain.sharding.NoSharding()))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the dataset")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="pipeline read threads")
    parser.add_argument("--render-sizes", type=int, nargs="*", default=[128, 256], help="square render sizes")
    parser.add_argument("--video-size", type=int, nargs=3, default=(40, 294, 392), metavar=("T", "H", "W"),
                        help="the dataset's 4 videos")
    parser.add_argument("--clip-frames", type=int, default=32)
    parser.add_argument("--crops", type=int, nargs="*", default=[126, 518], help="square crop sizes")
    parser.add_argument("--batches", type=int, nargs="*", default=[20, 6], help="timed batches, one per crop")
    args = parser.parse_args()
    if len(args.batches) != len(args.crops):
        parser.error(f"--batches takes one count per crop size: {len(args.crops)} crop(s), "
                     f"{len(args.batches)} count(s)")
    if args.clip_frames > args.video_size[0]:
        parser.error(f"--clip-frames {args.clip_frames} exceeds the videos' {args.video_size[0]} frames")

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    for size in args.render_sizes:
        print(f"render {size}x{size}: {render_fps(size, 16, range(6)):.1f} frames/s (one process)")

    num_frames, height, width = args.video_size
    with tempfile.TemporaryDirectory() as data_dir:
        config = builders.SyntheticConfig(name="bench", height=height, width=width, num_frames=num_frames,
                                          num_videos=(4, 0, 0))
        start = time.perf_counter()
        builders.prepare(builders.VdaSynthetic, data_dir, config=config, workers=args.workers)
        frames = config.num_frames * config.num_videos[0]
        print(
            f"write {frames} frames of {config.height}x{config.width}: "
            f"{frames / (time.perf_counter() - start):.1f} frames/s (workers={args.workers})"
        )
        for crop, batches in zip(args.crops, args.batches):
            rate = pipeline_clips_per_second(data_dir, args.clip_frames, crop, batches, args.threads)
            print(f"pipeline {args.clip_frames}x{crop}x{crop} clips: {rate:.2f} clips/s (read_threads={args.threads})")


if __name__ == "__main__":
    main()
