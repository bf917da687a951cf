"""Streaming latency per frame and host memory over a long stream (random weights).

  python scripts/benchmark_stream.py --model vits --input-size 280 --frames 300
  python scripts/benchmark_stream.py --model vits --input-size 140 --frames 3000 --report-every 500

Latency is wall time of ``StreamingDepth.step`` (frame in, depth on the host), the
two compiling calls excluded. Memory is the process's resident set, sampled as it
runs: it must stay flat once the caches are allocated.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import numpy as np

from vda_jax.checkpoint import load_checkpoint
from vda_jax.config import model_config
from vda_jax.inference.stream import StreamingDepth
from vda_jax.models.vda import VideoDepthAnything

_COMPILING_CALLS = 2  # the first frame (seeding) and the first regular step


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * resource.getpagesize()
    return current / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vits", help="a released size (random weights) or a model directory")
    parser.add_argument("--input-size", type=int, default=280)
    parser.add_argument("--frame-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--precision", choices=("fp32", "bf16"))
    parser.add_argument("--report-every", type=int, default=100, help="print memory every N frames")
    args = parser.parse_args()
    if args.frames <= _COMPILING_CALLS:
        parser.error(f"--frames must exceed {_COMPILING_CALLS}")

    try:
        is_folder = os.path.isdir(args.model)
        model = load_checkpoint(args.model) if is_folder else VideoDepthAnything(model_config(args.model))
    except ValueError as e:  # an unknown size, or a directory that is not a model
        parser.error(str(e))
    streamer = StreamingDepth(model, args.input_size, args.precision)
    pool = np.random.default_rng(0).integers(0, 256, (8, *args.frame_size, 3), dtype=np.uint8)
    print(f"{args.model}, input {args.input_size}, frames {args.frame_size[0]}x{args.frame_size[1]}, "
          f"{jax.devices()[0].device_kind}")

    latencies, settled = [], None
    for i in range(args.frames):
        start = time.perf_counter()
        streamer.step(pool[i % len(pool)])
        latencies.append(time.perf_counter() - start)
        if i + 1 == _COMPILING_CALLS:
            settled = _rss_mib()
        if (i + 1) % args.report_every == 0 or i + 1 == args.frames:
            current, peak = _rss_mib()
            print(f"frame {i + 1:6d}: rss {current:8.1f} MiB, peak {peak:8.1f} MiB")

    steady = np.array(latencies[_COMPILING_CALLS:]) * 1e3
    print(f"compiling calls: {latencies[0]:.2f} s, {latencies[1]:.2f} s")
    print(f"latency over {len(steady)} frames: median {np.median(steady):.1f} ms, "
          f"p99 {np.percentile(steady, 99):.1f} ms")
    current, peak = _rss_mib()
    print(f"rss after compiling {settled[0]:.1f} MiB -> at the end {current:.1f} MiB (peak {peak:.1f} MiB)")


if __name__ == "__main__":
    main()
