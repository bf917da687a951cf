"""The ``vda-jax`` command line: argument parsing only; every subcommand calls the library."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from vda_jax import interrupts
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
    p.add_argument("--config", help="the architecture, for sizes other than the released ones: a JSON of its "
                                    "fields, or a model directory (or its config.json) of the same architecture")
    p.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    p.set_defaults(handler=_convert)


def _train(args: argparse.Namespace) -> int | None:
    from vda_jax import compilation_cache
    from vda_jax.io.paths import check_output_folder
    from vda_jax.train.config import load_config, workdir_changes
    from vda_jax.train.coordination import Interrupted
    from vda_jax.train.loop import NonFiniteLossError, train

    config = load_config(args.config, args.overrides)
    check_output_folder(args.workdir, "--workdir")
    for change in workdir_changes(args.workdir, config):  # resuming: refuse what cannot change, say what did
        print(f"config changed since the last start: {change}")
    compilation_cache.enable()  # a resumed run skips recompiling its steps
    try:
        train(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"vda-jax train: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"vda-jax train: {e}; run the same command to resume", file=sys.stderr)
        return 128 + e.signum
    return None


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or fine-tune) a model; resumes from the workdir",
                       description="Train Video Depth Anything on one or many devices (and hosts). Running "
                                   "again with the same workdir resumes from its latest checkpoint; Ctrl-C "
                                   "saves a checkpoint and stops.")
    p.add_argument("--config", required=True,
                   help="a shipped config (synthetic_tiny, synthetic_claim, paper:vitl) or a .py file "
                        "defining get_config()")
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics.jsonl and the final model")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides as Python literals, e.g. optimizer.lr=3e-4 data.crop_size=(56,56)")
    p.set_defaults(handler=_train)


def _checkpoint_to_model(args: argparse.Namespace) -> None:
    from vda_jax.train.loop import model_from_checkpoint

    step = model_from_checkpoint(args.workdir, args.output_dir, step=args.step, overwrite=args.overwrite)
    print(f"wrote the model of step {step} to {args.output_dir}")


def _add_checkpoint_to_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint-to-model", help="turn a training checkpoint into a model directory",
                       description="Write the model of one checkpoint of a training run (the best, the latest or "
                                   "a given step) as a model directory for infer, eval and export.")
    p.add_argument("workdir", help="the training run's workdir")
    p.add_argument("output_dir", help="model directory to create")
    p.add_argument("--step", default="best", help="'best' (by checkpoint.best_metric; default), 'latest' or a step")
    p.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    p.set_defaults(handler=_checkpoint_to_model)


def _export(args: argparse.Namespace) -> None:
    from vda_jax.export.exporter import ExportOptions, check_output, export_checkpoint
    from vda_jax.runtime.metadata import metadata_path

    options = ExportOptions(format=args.format, frames=args.frames, height=args.height, width=args.width,
                            precision=args.precision, streaming=args.streaming)
    if not (args.checkpoint or args.model):
        raise ValueError("name the model to export: a model directory, or --model NAME")
    check_output(args.output, options, overwrite=args.overwrite)  # before --model downloads anything
    metadata = export_checkpoint(_model_source(args), args.output, options, overwrite=args.overwrite)
    print(f"wrote {args.output}" + (f" ({metadata['kind']} model; see {metadata_path(args.output)})"
                                    if metadata else ""))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX, StableHLO or the official PyTorch layout",
                       description="Writes a deployment artefact (OUT.onnx or OUT.stablehlo, with OUT.onnx.json "
                                   "or OUT.stablehlo.json describing its inputs, outputs and preprocessing) or an "
                                   "official checkpoint (OUT.pth or OUT.safetensors) for the PyTorch code.")
    _add_model_options(p, "model directory (from `vda-jax convert` or training)", positional=True)
    p.add_argument("output", help="file to write: .onnx, .stablehlo, .pth or .safetensors")
    p.add_argument("--format", choices=("onnx", "stablehlo", "official"), default="onnx", help="what to write")
    p.add_argument("--frames", type=_positive_int, default=32,
                   help="clip length T of the clip model (vda-jax infer --onnx runs 32-frame windows)")
    p.add_argument("--height", type=_positive_int, help="network input height, a multiple of 14 "
                                                        "(default: the checkpoint's input size)")
    p.add_argument("--width", type=_positive_int, help="network input width, a multiple of 14")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="compute precision (ONNX: fp32 only; build fp16 engines from it)")
    p.add_argument("--streaming", action="store_true",
                   help="one frame in, depth out, with the temporal caches as explicit inputs and outputs")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(handler=_export)


def _infer(args: argparse.Namespace) -> int:
    import jax

    from vda_jax import compilation_cache
    from vda_jax.assets import SAMPLE_VIDEO
    from vda_jax.inference import files
    from vda_jax.io.video import expand_inputs
    from vda_jax.train.sharding import maybe_initialize_distributed

    options = files.OutputOptions(args.output_dir, grayscale=args.grayscale, save_npz=args.save_npz,
                                  save_exr=args.save_exr, save_ply=args.save_ply,
                                  focal_length=(args.focal_length_x, args.focal_length_y), overwrite=args.overwrite,
                                  video_preset=args.video_preset)
    files.check_options(options)
    sources = expand_inputs(args.inputs + ([SAMPLE_VIDEO] if args.sample else []))
    if not sources:
        raise ValueError("no inputs: name videos, folders or patterns, or pass --sample")
    if args.onnx and (args.checkpoint or args.model):
        raise ValueError(f"give --{'checkpoint' if args.checkpoint else 'model'} or --onnx, not both")
    files.check_inputs(sources, batch_size=args.batch_size, streaming=args.streaming, exported=bool(args.onnx))
    maybe_initialize_distributed()  # several processes split the inputs, each on its own devices
    compilation_cache.enable()
    if args.onnx:
        from vda_jax.runtime.model import ExportedModel

        model = ExportedModel(args.onnx)
        input_size = model.meta["input_size"]
    else:
        model, input_size = _load_model(_model_source(args))
    read = files.ReadOptions(max_res=args.max_res, max_len=args.max_len, target_fps=args.target_fps)
    share = (jax.process_index(), jax.process_count())
    report = files.infer_files(model, sources, options, read, input_size=args.input_size or input_size,
                               precision=args.precision, batch_size=args.batch_size, streaming=args.streaming,
                               progress=not args.quiet, share=share)
    total = len(report.written) + len(report.skipped) + len(report.failed)
    summary = [f"{len(report.written)} of {total} videos written to {args.output_dir}"]
    summary += [f"{len(report.skipped)} done before"] if report.skipped else []
    summary += [f"{len(report.failed)} failed"] if report.failed else []
    print((f"process {share[0]} of {share[1]}: " if share[1] > 1 else "") + "; ".join(summary))
    return 1 if report.failed else 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    from vda_jax.io.video import X264_PRESETS

    p = sub.add_parser("infer", help="depth for videos, image folders or image sequences",
                       description="Consistent depth for videos of any length (the official sliding-window "
                                   "algorithm), many videos per compiled step; writes <name>_src.mp4, "
                                   "<name>_vis.mp4 and the requested raw outputs. Launched on several "
                                   "processes (SLURM, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                                   "JAX_PROCESS_ID), the processes split the inputs.")
    p.add_argument("inputs", nargs="*", help="video files, folders (of videos, or of images), globs, "
                                             "printf patterns such as frames/%%05d.png")
    p.add_argument("--sample", action="store_true", help="also process the bundled sample video")
    _add_model_options(p, "model directory from `vda-jax convert` (default: the bundled demo model)")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="run a model from `vda-jax export` in onnxruntime instead "
                                                        "(its network size must fit the videos)")
    p.add_argument("--output-dir", default="./outputs", help="folder of the outputs (created if missing)")
    p.add_argument("--input-size", type=_input_size,
                   help="network input short side (default: the checkpoint's, else 518)")
    p.add_argument("--max-res", type=_positive_or_off, default=1280,
                   help="downscale frames whose long side exceeds this (-1: never)")
    p.add_argument("--max-len", type=_positive_or_off, default=-1, help="at most this many frames (-1: all)")
    p.add_argument("--target-fps", type=_positive_or_off_float, default=-1,
                   help="subsample to about this frame rate (-1: keep every frame)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default: bf16 on GPU, "
                                                                 "fp32 on CPU)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="videos of one frame size processed together (sharded over this process's devices)")
    p.add_argument("--streaming", action="store_true", help="causal streaming mode (one frame in, one depth out)")
    p.add_argument("--grayscale", action="store_true", help="grey instead of the inferno colour map")
    p.add_argument("--video-preset", choices=X264_PRESETS, default="veryfast",
                   help="x264 speed for the mp4s: veryfast (default) is ~2.3x faster than medium (the official "
                        "outputs' setting) at about the same size and quality")
    p.add_argument("--save-npz", action="store_true", help="also write <name>_depths.npz (key 'depths')")
    p.add_argument("--save-exr", action="store_true", help="also write <name>_depths_exr/ (needs vda-jax[exr])")
    p.add_argument("--save-ply", action="store_true", help="metric models: per-frame point clouds in <name>_ply/")
    p.add_argument("--focal-length-x", type=_positive_float, default=470.4, help="for --save-ply, in pixels")
    p.add_argument("--focal-length-y", type=_positive_float, default=470.4, help="for --save-ply, in pixels")
    p.add_argument("--overwrite", action="store_true", help="redo videos whose outputs exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_infer)


def _eval(args: argparse.Namespace) -> None:
    from vda_jax.data.builders import open_split
    from vda_jax.eval import runner
    from vda_jax.io.paths import check_output_file

    dataset, _, split = args.dataset.partition(":")
    split = split or "test"
    if args.output:
        check_output_file(args.output, "--output")  # not after the evaluation
    if args.model:  # a dataset that is not there is said before the weights are fetched
        open_split(dataset, split, args.data_dir)
    model, input_size = _load_model(_model_source(args))
    report = runner.evaluate(model, dataset, split, data_dir=args.data_dir,
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
    _add_model_options(p, "model directory (default: the bundled demo model)")
    p.add_argument("--dataset", required=True, help="NAME[:split], e.g. vda_synthetic:test or vda_benchmark/kitti")
    p.add_argument("--data-dir", help="tensorflow-datasets data directory")
    p.add_argument("--max-frames", type=_positive_int, help="score at most this many frames per video")
    p.add_argument("--output", help="also write the report as JSON")
    p.add_argument("--input-size", type=_input_size, help="default: the checkpoint's, else 518")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default="full",
                   help="window strategy (the paper's Table 5): full is the released method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)


def _pseudo_label(args: argparse.Namespace) -> None:
    from vda_jax.data.pseudo_label import check_folders, pseudo_label

    check_folders(args.images, args.output)  # before the model loads
    model, input_size = _load_model(_model_source(args))
    count = pseudo_label(model, args.images, args.output, input_size=args.input_size or input_size,
                         precision=args.precision, batch_size=args.batch_size, progress=not args.quiet)
    print(f"labelled {count} new image(s); {args.output} is a source folder for the vda_pseudo_labels builder")


def _add_pseudo_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudo-label", help="label an image folder with a teacher model (T = 1)",
                       description="Writes teacher depth for every image (resumable: labelled images are "
                                   "skipped) in the layout of the vda_pseudo_labels dataset builder.")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--output", required=True, help="output folder")
    _add_model_options(p, "teacher model directory (default: the bundled demo model)")
    p.add_argument("--input-size", type=_input_size, help="default: the checkpoint's, else 518")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_pseudo_label)


def _demo(args: argparse.Namespace) -> None:
    from vda_jax import compilation_cache, demo
    from vda_jax.devices import Platform
    from vda_jax.precision import default_precision

    demo.check_installed()
    demo.check_address(args.host, args.port)  # before the model loads
    model, input_size = _load_model(_model_source(args))
    compilation_cache.enable()
    limits = demo.Limits(max_upload_mb=args.max_upload_mb, max_len=args.max_len, max_res=args.max_res)
    about = (f"Model: {args.model or args.checkpoint or 'the bundled demo model (synthetic scenes only)'}, "
             f"{'metric' if model.config.metric else 'relative'} depth.")
    with demo.running(model, args.input_size or input_size, limits, about=about, host=args.host, port=args.port,
                      precision=args.precision or default_precision(Platform.of())) as page:
        print(f"vda-jax demo: serving {page.local_url} (Ctrl-C stops)", flush=True)
        demo.serve_until_stopped(page)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve a web page: upload a video, see and download its depth",
                       description="A Gradio app (needs the demo extra: pip install -e \".[demo]\") over the "
                                   "same computation as `vda-jax infer`, one request at a time. It listens on "
                                   "127.0.0.1 only unless --host says otherwise (0.0.0.0: every interface).")
    _add_model_options(p, "model directory (default: the bundled demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=7860, help="port to listen on")
    p.add_argument("--max-upload-mb", type=_positive_float, default=200, help="larger uploads are refused")
    p.add_argument("--max-len", type=_positive_int, default=500, help="at most this many frames per video")
    p.add_argument("--max-res", type=_positive_or_off, default=1280,
                   help="downscale frames whose long side exceeds this (-1: never)")
    p.add_argument("--input-size", type=_input_size, help="the page's default input size (default: the "
                                                            "checkpoint's, else 518)")
    p.add_argument("--precision", choices=PRECISIONS, help="the page's default precision (default: bf16 on GPU, "
                                                           "fp32 on CPU)")
    p.set_defaults(handler=_demo)


def _models(args: argparse.Namespace) -> None:
    from vda_jax import pretrained

    print(pretrained.format_table())


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the official models that --model takes",
                       description="The official checkpoints by name, with their sizes, licences and whether "
                                   "they are cached. `--model NAME` downloads one from the Hugging Face Hub "
                                   "(HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN apply), checks it and converts it "
                                   "once.")
    p.set_defaults(handler=_models)


def _add_model_options(p: argparse.ArgumentParser, checkpoint_help: str, *, positional: bool = False) -> None:
    """A model directory (``--checkpoint``, or a positional ``checkpoint``) or ``--model NAME``, not both."""
    source = p.add_mutually_exclusive_group()
    if positional:
        source.add_argument("checkpoint", nargs="?", help=checkpoint_help)
    else:
        source.add_argument("--checkpoint", help=checkpoint_help)
    source.add_argument("--model", metavar="NAME", help="an official model by name, downloaded and converted on "
                                                        "first use (`vda-jax models` lists them)")
    p.add_argument("--revision", help="the Hub branch, tag or commit of --model (default: main)")


def _model_source(args: argparse.Namespace) -> str | None:
    """The model directory the options name: ``--checkpoint``'s, or ``--model``'s (fetched); None for the default."""
    if args.revision and not args.model:
        raise ValueError("--revision goes with --model NAME")
    if args.model:
        from vda_jax import pretrained

        return pretrained.model_dir(args.model, revision=args.revision)
    return args.checkpoint


def _checked(kind: type[int] | type[float], ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` where ``ok`` holds, else "must be RULE, got TEXT"."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_port = _checked(int, lambda v: 1 <= v <= 65535, "a port from 1 to 65535")
_input_size = _checked(int, lambda v: v >= 14, "an integer >= 14 (one ViT patch)")
# The official run.py's limits: -1 turns them off (0 or other negatives are mistakes, not "off").
_positive_or_off = _checked(int, lambda v: v >= 1 or v == -1, "a positive integer or -1 (off)")
_positive_or_off_float = _checked(float, lambda v: v > 0 or v == -1, "a positive number or -1 (off)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (``--help`` shows the usage); an argument no
    command takes is the command's error (its ``--help`` lists what it takes)."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return parsed


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


def _load_model(checkpoint: str | None):
    """The model and its default input size (the checkpoint's own, else 518)."""
    from vda_jax.checkpoint import load_checkpoint, read_config

    if checkpoint is None:
        from vda_jax.assets import bundled_model_dir

        checkpoint = bundled_model_dir()
    elif not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist; give a model directory from "
                                "`vda-jax convert` or training")
    _, info = read_config(checkpoint)
    return load_checkpoint(checkpoint), int(info.get("input_size", 518))


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert, _add_infer, _add_train, _add_checkpoint_to_model, _add_eval, _add_pseudo_label, _add_export,
    _add_demo, _add_models]


def build_parser() -> argparse.ArgumentParser:
    from vda_jax import __version__

    parser = _Parser(prog="vda-jax", description="Video Depth Anything in JAX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = _HelpFormatter
    parser.commands = sub.choices
    return parser


@contextlib.contextmanager
def _interrupts() -> Iterator[tuple[Callable[[], int], Callable[[], None]]]:
    """Yields ("the stop signal received, or 0", "from now on a stop signal raises KeyboardInterrupt").

    The stop signals are Ctrl-C (SIGINT) and SIGTERM, what ``timeout``, SLURM and Kubernetes
    send: both stop a command the same way, cleaning up after it. Until the second is called a
    signal is only noted: an interrupt inside the import of an extension module (numpy, jaxlib)
    makes it print a traceback. An interrupt that Python drops (raised in a gc callback, such as
    JAX's, or in ``__del__``) is delivered again.
    """
    received: list[int] = []
    raising = threading.Event()

    def interrupted() -> int:
        return received[0] if received else 0

    if threading.current_thread() is not threading.main_thread():
        yield interrupted, raising.set
        return

    def handler(signum, frame):
        del frame
        if not received:
            received.append(signum)
        if raising.is_set():
            raise KeyboardInterrupt

    def raise_from_now() -> None:
        raising.set()
        if received:
            raise KeyboardInterrupt

    def again() -> None:
        if signal.getsignal(received[0]) is handler:  # still in the block
            signal.pthread_kill(threading.main_thread().ident, received[0])

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):  # dropped: no traceback; it comes again a moment
            # later, once this hook and the callback have returned (else it would be dropped in them again)
            redeliver = threading.Timer(0.05, again)
            redeliver.daemon = True
            redeliver.start()
        else:
            previous_hook(info)

    previous = {signum: signal.signal(signum, handler) for signum in interrupts.STOP_SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield interrupted, raise_from_now
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        sys.unraisablehook = previous_hook


def _run(args: argparse.Namespace, interrupted: Callable[[], int]) -> int:
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        if not interrupted():  # else the error is the interrupt's doing
            print(f"vda-jax {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code (128 + the signal's number when a stop signal ended it)."""
    with _interrupts() as (interrupted, raise_from_now):
        try:
            import jax  # noqa: F401  (the slow start-up, with stop signals only noted)

            args = build_parser().parse_args(argv)
            raise_from_now()
            code = _run(args, interrupted)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except Exception:
            if not interrupted():
                raise
            code = 128 + signal.SIGINT  # the interrupt's doing, e.g. an ImportError from an extension it broke
        signum = interrupted() or (signal.SIGINT if code == 128 + signal.SIGINT else 0)
        if signum:
            print("vda-jax: interrupted" if signum == signal.SIGINT else
                  f"vda-jax: stopped by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum
    return code


def entry() -> None:
    """The ``vda-jax`` console script.

    After a stop signal it exits without the interpreter's teardown: background threads of XLA
    and orbax may still be running then, and tearing the runtime down under them can crash.
    Every file has been cleaned up by then (the commands write through temporary paths).
    """
    code = main()
    # In a multi-process job the processes stop together and leave through JAX's shutdown barrier.
    stopped = code in {128 + signum for signum in interrupts.STOP_SIGNALS}
    if stopped and not ("jax" in sys.modules and sys.modules["jax"].process_count() > 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
