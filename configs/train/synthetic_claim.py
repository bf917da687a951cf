"""The tiny model with the official temporal setting, at input size 112: clips for the 32-frame windows.

Used by scripts/reproduce_claim.py (and for the bundled demo model):

    vda-jax train --config configs/train/synthetic_claim.py --workdir /tmp/claim/temporal

Renders of 128x160 cropped to 112x112: at 112 the network sees 8x10 patches of the scenes
(4x5 at 56, too coarse to show their objects), for the same cost per step as 4x the frames at 56.
Many short videos rather than few long ones: with 128 videos of 48 frames the model fits the training
scenes while held-out ones stop improving; 1024 of 12 frames give 8x the scenes for 2x the frames
(TFDS writes a split of under 1 GB without TensorFlow).
"""

import os

from vda_jax.train.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "synthetic_tiny.py"))
    c.model.num_frames = 32
    c.data.clip_frames = 8
    c.data.clip_hop = 4
    c.data.crop_size = (112, 112)
    c.batch_size = 2
    c.synthetic.name = "claim"
    c.synthetic.height = 128
    c.synthetic.width = 160
    c.synthetic.num_frames = 12
    c.synthetic.num_videos = (1024, 8, 0)
    c.data.video_dataset = "vda_synthetic/claim"
    c.total_steps = 1500
    c.eval.every = 500
    c.checkpoint.every = 500
    c.log_every = 50
    return c
