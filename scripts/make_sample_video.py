"""Renders the sample video shipped in the package (vda_jax/assets/sample.mp4).

    python scripts/make_sample_video.py

A synthetic scene from our own renderer (vda_jax.data.synthetic), so the package
carries no third-party footage.
"""

from __future__ import annotations

import argparse

from vda_jax.assets import SAMPLE_RENDER, SAMPLE_VIDEO
from vda_jax.data.synthetic import render_video
from vda_jax.io.video import VideoWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=SAMPLE_VIDEO)
    parser.add_argument("--seed", type=int, default=SAMPLE_RENDER["seed"])
    parser.add_argument("--frames", type=int, default=SAMPLE_RENDER["num_frames"])
    parser.add_argument("--height", type=int, default=SAMPLE_RENDER["height"])
    parser.add_argument("--width", type=int, default=SAMPLE_RENDER["width"])
    parser.add_argument("--fps", type=float, default=15)
    args = parser.parse_args()
    video = render_video(args.seed, args.frames, args.height, args.width)
    with VideoWriter(args.output, args.fps) as writer:
        writer.write(video["frames"])
    print(f"wrote {args.output}: {args.frames} frames of {args.height}x{args.width}")


if __name__ == "__main__":
    main()
