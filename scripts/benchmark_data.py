"""Throughput of the synthetic renderer and of the training input pipeline on this machine.

Renders videos at 128x128 and 256x256 (frames/s, one process, best of 3), writes a synthetic
TFDS dataset (4 videos of 40 frames at 294x392) to a temporary folder once, then times the grain
pipeline reading 32-frame clips cropped to 126x126 and to 518x518 (clips/s, after a warm-up
batch).

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


def pipeline_clips_per_second(data_dir: str, crop: int, batches: int, threads: int) -> float:
    config = DataConfig(
        video_dataset="vda_synthetic/bench",
        data_dir=data_dir,
        clip_frames=32,
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
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    for size in (128, 256):
        print(f"render {size}x{size}: {render_fps(size, 16, range(6)):.1f} frames/s (one process)")

    with tempfile.TemporaryDirectory() as data_dir:
        config = builders.SyntheticConfig(name="bench", height=294, width=392, num_frames=40, num_videos=(4, 0, 0))
        start = time.perf_counter()
        builders.prepare(builders.VdaSynthetic, data_dir, config=config, workers=args.workers)
        frames = config.num_frames * config.num_videos[0]
        print(
            f"write {frames} frames of {config.height}x{config.width}: "
            f"{frames / (time.perf_counter() - start):.1f} frames/s (workers={args.workers})"
        )
        for crop, batches in ((126, 20), (518, 6)):
            rate = pipeline_clips_per_second(data_dir, crop, batches, args.threads)
            print(f"pipeline 32x{crop}x{crop} clips: {rate:.2f} clips/s (read_threads={args.threads})")


if __name__ == "__main__":
    main()
