"""The tiny model with the official temporal setting: 32-frame clips, so it runs the 32-frame windows.

Used by scripts/reproduce_claim.py (and for the bundled demo model):

    vda-jax train --config configs/train/synthetic_claim.py --workdir /tmp/claim/temporal
"""

import os

from vda_jax.train.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "synthetic_tiny.py"))
    c.model.num_frames = 32
    c.data.clip_frames = 32
    c.data.clip_hop = 8
    c.batch_size = 2
    c.synthetic.name = "claim"
    c.synthetic.num_frames = 48
    c.data.video_dataset = "vda_synthetic/claim"
    c.total_steps = 1500
    c.eval.every = 500
    c.checkpoint.every = 500
    c.log_every = 50
    return c
