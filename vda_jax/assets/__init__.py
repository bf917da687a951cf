"""Files shipped inside the package: the bundled demo model and sample video."""

from __future__ import annotations

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(ASSETS, "demo_model")
SAMPLE_VIDEO = os.path.join(ASSETS, "sample.mp4")
# The render the sample video is made from (scripts/make_sample_video.py): its true depth is known.
SAMPLE_RENDER = {"seed": 7, "num_frames": 90, "height": 192, "width": 256}


def bundled_model_dir() -> str:
    """The bundled demo model (trained on synthetic scenes only; convert official weights for real footage)."""
    if not os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
        raise FileNotFoundError("this installation has no bundled model; pass --checkpoint DIR "
                                "(convert official weights with `vda-jax convert`)")
    return DEMO_MODEL
