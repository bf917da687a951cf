"""Per-device memory, collectives and FLOPs of the train, window and stream steps on a compile target.

Compiles (never runs) the programs training and inference run, with the accelerator's own
compiler when the target is one (``vda_jax.aot.targets``: "h100:8", "a100-40g:8",
"tpu-v5e:4x4", ..., which need ``pip install -e ".[aot]"``; "cpu:N" needs nothing), and
reads, per device: the argument, output and temporary bytes, whether that fits the device
(GPUs: JAX's default 75% share, ``XLA_PYTHON_CLIENT_MEM_FRACTION``; TPUs: the whole HBM),
the fused attention calls, the collectives, the FLOPs and a roofline estimate of the step.
Nothing large is allocated and no GPU or TPU is needed.

  python scripts/memory_plan.py --target h100:8                       # the table, paper configs
  python scripts/memory_plan.py --target h100:8 --only vitl:train --json
  python scripts/memory_plan.py --target tpu-v5p:2x2x2 --only vitl:train batch_size=32  # config overrides
  python scripts/memory_plan.py --target cpu:2 --config synthetic_tiny --frame 56x56 --input-size 56
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator

GIB = 2**30
JOBS = ("train", "window", "stream")
PAPER_VARIANTS = ("vits", "vitl")
# Window rows: (precision, videos per step); the videos split over as many of the target's devices.
WINDOW_ROWS = (("fp32", 1), ("bf16", 1), ("bf16", 8))
STREAM_PRECISIONS = ("fp32", "bf16")


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 720x1280, got {text!r}")
    return int(height), int(width)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", default="cpu:8", help="devices to compile for: cpu:N, h100:N, h200:N, "
                        "a100-80g:N, a100-40g:N, tpu-<gen>:<topology> (e.g. tpu-v5e:2x2)")
    parser.add_argument("--config", default="paper", help="training config: 'paper' (its vits and vitl variants), "
                        "another shipped name or a .py file; its model is the one the window and stream rows use")
    parser.add_argument("--only", help="one group: MODEL:JOB (e.g. vitl:train), or JOB for every model")
    parser.add_argument("--frame", type=_size, default=(720, 1280), help="video frame size of the window and "
                        "stream rows, HEIGHTxWIDTH")
    parser.add_argument("--input-size", type=int, default=518, help="inference input size (short side)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    if args.only is not None and args.only.rpartition(":")[2] not in JOBS:
        parser.error(f"--only takes MODEL:JOB or JOB with JOB one of {', '.join(JOBS)}, got {args.only!r}")
    return args


def _configs(name: str, overrides: list[str]):
    from vda_jax.train.config import load_config

    if name == "paper":
        return [(variant, load_config(f"paper:{variant}", overrides)) for variant in PAPER_VARIANTS]
    return [(name.removesuffix(".py").rpartition("/")[2], load_config(name, overrides))]


def plans(args: argparse.Namespace, target) -> Iterator[dict]:
    """One JSON row per compiled program."""
    from vda_jax.aot import programs, report
    from vda_jax.inference.preprocess import network_size
    from vda_jax.train.config import model_config_from

    net_size = network_size(args.frame, args.input_size)
    for label, config in _configs(args.config, args.overrides):
        model = model_config_from(config.model)
        for job in JOBS:
            if args.only not in (None, job, f"{label}:{job}"):
                continue
            if job == "train":
                clip = config.data.clip_frames
                rows = [("train", config.precision, config.batch_size, clip, config.data.crop_size,
                         functools.partial(programs.train_step, config, target))]
                if config.data.image_ratio > 0:
                    rows.append(("train-images", config.precision, config.image_batch_size, 1, config.data.crop_size,
                                 functools.partial(programs.train_step, config, target, clip_frames=1)))
            elif job == "window":
                window = functools.partial(programs.window_step, model, frame_size=args.frame, net_size=net_size,
                                           target=target)
                rows = [(f"window-{part}", precision, videos, 32, net_size,
                         functools.partial(window, precision, slots=videos, part=part))
                        for precision, videos in WINDOW_ROWS for part in programs.WINDOW_PARTS]
            else:
                rows = [("stream", precision, 1, 1, net_size,
                         functools.partial(programs.stream_step, model, precision, args.frame, net_size, target))
                        for precision in STREAM_PRECISIONS]
            for name, precision, batch, frames, (height, width), trace in rows:
                start = time.perf_counter()
                traced = trace()
                compiled, options = programs.compile_for(traced.lower(), target)
                figures = report.analyse(traced, compiled, target, time.perf_counter() - start)
                yield {"model": label, "job": name, "precision": precision, "batch": batch, "frames": frames,
                       "height": height, "width": width, **figures.to_json(), "compiler_options": options}


def _collectives(row: dict) -> str:
    return " ".join(f"{kind}:{c['count']}/{c['bytes'] / GIB:.2f}G" for kind, c in sorted(row["collectives"].items()))


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'model':14} {'job':13} {'prec':4} {'batch':>5} {'frames':>6} {'size':>9} {'dev':>4} {'args':>6} "
              f"{'out':>6} {'temp':>6} {'total':>6} {'usable':>6} {'fits':>4} {'fmha':>4} {'TFLOP':>7} "
              f"{'roof ms':>7} {'compile':>7}  collectives (count/bytes)   [GiB per device]")
    usable = "-" if row["usable_memory_bytes"] is None else f"{row['usable_memory_bytes'] / GIB:6.1f}"
    fits = {None: "-", True: "yes", False: "NO"}[row["fits"]]
    tflop = "-" if row["flops"] is None else f"{row['flops'] / 1e12:7.2f}"
    roof = "-" if row["roofline_step_seconds"] is None else f"{row['roofline_step_seconds'] * 1e3:7.1f}"
    print(f"{row['model']:14} {row['job']:13} {row['precision']:4} {row['batch']:5} {row['frames']:6} "
          f"{row['height']:4}x{row['width']:<4} {row['devices']:4} {row['arguments_bytes'] / GIB:6.2f} "
          f"{row['outputs_bytes'] / GIB:6.2f} {row['temporaries_bytes'] / GIB:6.2f} "
          f"{row['per_device_bytes'] / GIB:6.2f} {usable:>6} {fits:>4} {row['fused_attention_calls']:4} {tflop:>7} "
          f"{roof:>7} {row['compile_s']:7.1f}  {_collectives(row)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    # Compile-only: never start a GPU or TPU backend; cpu:N asks for N host devices.
    jax.config.update("jax_platforms", "cpu")
    kind, _, count = args.target.partition(":")
    if kind == "cpu" and count.isdigit():
        jax.config.update("jax_num_cpu_devices", int(count))
    from vda_jax.aot.targets import TargetError, get_target

    try:
        target = get_target(args.target)
    except TargetError as e:
        print(f"memory_plan.py: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for row in plans(args, target):
        if not args.json:
            print_row(row, header=not rows)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
