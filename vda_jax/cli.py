"""The ``vda-jax`` command line: argument parsing only; every subcommand calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert]


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
