"""The ``vda-jax`` command line: argument parsing only; every subcommand calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from vda_jax.precision import PRECISIONS

Handler = Callable[[argparse.Namespace], int | None]


def _convert(args: argparse.Namespace) -> None:
    from vda_jax.convert.convert import convert_checkpoint

    config = convert_checkpoint(args.source, args.output_dir, encoder=args.encoder, metric=args.metric,
                                config_path=args.config, overwrite=args.overwrite)
    print(f"wrote {config.name} model to {args.output_dir}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official .pth/.safetensors checkpoint to a vda-jax model",
                       description="Convert a Video Depth Anything or Depth Anything V2 checkpoint (.pth or "
                                   ".safetensors, read without torch) into a vda-jax model directory.")
    p.add_argument("source", help="official checkpoint file")
    p.add_argument("output_dir", help="model directory to create")
    p.add_argument("--encoder", choices=("vits", "vitb", "vitl", "vitg"),
                   help="expected encoder (detected from the tensor shapes; given, it is checked)")
    p.add_argument("--metric", action="store_true", help="the checkpoint is a metric-depth model")
    p.add_argument("--config", help="architecture JSON for sizes other than the released ones")
    p.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    p.set_defaults(handler=_convert)


def _train(args: argparse.Namespace) -> int | None:
    from vda_jax.train.config import load_config
    from vda_jax.train.loop import NonFiniteLossError, train

    config = load_config(args.config, args.overrides)
    _enable_compilation_cache()  # a resumed run skips recompiling its steps
    try:
        train(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"vda-jax train: error: {e}", file=sys.stderr)
        return 1
    return None


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or fine-tune) a model; resumes from the workdir",
                       description="Train Video Depth Anything on one or many devices (and hosts). Running "
                                   "again with the same workdir resumes from its latest checkpoint; Ctrl-C "
                                   "saves a checkpoint and stops.")
    p.add_argument("--config", required=True,
                   help="config file defining get_config(), e.g. configs/train/synthetic_tiny.py or "
                        "configs/train/paper.py:vitl")
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics.jsonl and the final model")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides as Python literals, e.g. optimizer.lr=3e-4 data.crop_size=(56,56)")
    p.set_defaults(handler=_train)


def _infer(args: argparse.Namespace) -> int:
    from vda_jax.assets import SAMPLE_VIDEO
    from vda_jax.inference import files
    from vda_jax.io.video import expand_inputs

    _enable_compilation_cache()
    sources = expand_inputs(args.inputs + ([SAMPLE_VIDEO] if args.sample else []))
    if not sources:
        raise ValueError("no inputs: name videos, folders or patterns, or pass --sample")
    model, input_size = _load_model(args.checkpoint)
    options = files.OutputOptions(args.output_dir, grayscale=args.grayscale, save_npz=args.save_npz,
                                  save_exr=args.save_exr, save_ply=args.save_ply,
                                  focal_length=(args.focal_length_x, args.focal_length_y), overwrite=args.overwrite)
    read = files.ReadOptions(max_res=args.max_res, max_len=args.max_len, target_fps=args.target_fps)
    failed = files.infer_files(model, sources, options, read, input_size=args.input_size or input_size,
                               precision=args.precision,
                               batch_size=args.batch_size, streaming=args.streaming, progress=not args.quiet)
    done = len(sources) - len(failed)
    print(f"{done}/{len(sources)} videos written to {args.output_dir}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="depth for videos, image folders or image sequences",
                       description="Consistent depth for videos of any length (the official sliding-window "
                                   "algorithm), many videos per compiled step; writes <name>_src.mp4, "
                                   "<name>_vis.mp4 and the requested raw outputs.")
    p.add_argument("inputs", nargs="*", help="video files, folders (of videos, or of images), globs, "
                                             "printf patterns such as frames/%%05d.png")
    p.add_argument("--sample", action="store_true", help="also process the bundled sample video")
    p.add_argument("--checkpoint", help="model directory from `vda-jax convert` (default: the bundled demo model)")
    p.add_argument("--output-dir", default="./outputs")
    p.add_argument("--input-size", type=_positive_int,
                   help="network input short side (default: the checkpoint's, else 518)")
    p.add_argument("--max-res", type=int, default=1280, help="downscale frames whose long side exceeds this")
    p.add_argument("--max-len", type=int, default=-1, help="at most this many frames (-1: all)")
    p.add_argument("--target-fps", type=float, default=-1, help="subsample to about this frame rate (-1: keep)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default: bf16 on GPU, "
                                                                 "fp32 on CPU)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="videos of one frame size processed together (sharded over all devices)")
    p.add_argument("--streaming", action="store_true", help="causal streaming mode (one frame in, one depth out)")
    p.add_argument("--grayscale", action="store_true", help="grey instead of the inferno colour map")
    p.add_argument("--save-npz", action="store_true", help="also write <name>_depths.npz (key 'depths')")
    p.add_argument("--save-exr", action="store_true", help="also write <name>_depths_exr/ (needs vda-jax[exr])")
    p.add_argument("--save-ply", action="store_true", help="metric models: per-frame point clouds in <name>_ply/")
    p.add_argument("--focal-length-x", type=float, default=470.4)
    p.add_argument("--focal-length-y", type=float, default=470.4)
    p.add_argument("--overwrite", action="store_true", help="redo videos whose outputs exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_infer)


def _eval(args: argparse.Namespace) -> None:
    from vda_jax.eval import runner

    dataset, _, split = args.dataset.partition(":")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model, input_size = _load_model(args.checkpoint)
    report = runner.evaluate(model, dataset, split or "test", data_dir=args.data_dir,
                             max_frames=args.max_frames, input_size=args.input_size or input_size,
                             precision=args.precision,
                             strategy=args.strategy, progress=not args.quiet)
    print(runner.format_table(report))
    if args.output:
        runner.write_json(report, args.output)
        print(f"wrote {args.output}")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from vda_jax.eval.strategies import STRATEGIES

    p = sub.add_parser("eval", help="AbsRel, delta1, RMSE and TAE of a model on a dataset",
                       description="Runs the long-video inference on every video of a dataset built by "
                                   "vda_jax.data.builders and scores it as the official benchmark does.")
    p.add_argument("--checkpoint", help="model directory (default: the bundled demo model)")
    p.add_argument("--dataset", required=True, help="NAME[:split], e.g. vda_synthetic:test or vda_benchmark/kitti")
    p.add_argument("--data-dir", help="tensorflow-datasets data directory")
    p.add_argument("--max-frames", type=_positive_int, help="score at most this many frames per video")
    p.add_argument("--output", help="also write the report as JSON")
    p.add_argument("--input-size", type=_positive_int, help="default: the checkpoint's, else 518")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default="full",
                   help="window strategy (the paper's Table 5): full is the released method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)


def _pseudo_label(args: argparse.Namespace) -> None:
    from vda_jax.data.pseudo_label import pseudo_label

    model, input_size = _load_model(args.checkpoint)
    count = pseudo_label(model, args.images, args.output, input_size=args.input_size or input_size,
                         precision=args.precision, batch_size=args.batch_size, progress=not args.quiet)
    print(f"labelled {count} new image(s); {args.output} is a source folder for the vda_pseudo_labels builder")


def _add_pseudo_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudo-label", help="label an image folder with a teacher model (T = 1)",
                       description="Writes teacher depth for every image (resumable: labelled images are "
                                   "skipped) in the layout of the vda_pseudo_labels dataset builder.")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--checkpoint", help="teacher model directory (default: the bundled demo model)")
    p.add_argument("--input-size", type=_positive_int, help="default: the checkpoint's, else 518")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_pseudo_label)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _enable_compilation_cache() -> None:
    """Compiled steps persist on disk, so a second run with the same shapes starts fast."""
    import jax

    cache = os.environ.get("VDA_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vda-jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _load_model(checkpoint: str | None):
    """The model and its default input size (the checkpoint's own, else 518)."""
    from vda_jax.checkpoint import load_checkpoint, read_config

    if checkpoint is None:
        from vda_jax.assets import bundled_model_dir

        checkpoint = bundled_model_dir()
    _, info = read_config(checkpoint)
    return load_checkpoint(checkpoint), int(info.get("input_size", 518))


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert, _add_infer, _add_train, _add_eval, _add_pseudo_label]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vda-jax", description="Video Depth Anything in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("vda-jax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"vda-jax {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
