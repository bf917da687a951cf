"""A tiny model trained from scratch on rendered synthetic videos: minutes on a 2-core CPU.

    vda-jax train --config synthetic_tiny --workdir /tmp/vda_tiny

The dataset (64x80 renders, 24-frame videos) is written to WORKDIR/data on the first run. It
trains on 8-frame clips; its temporal position table covers 32 frames, so the model
runs the 32-frame windows of `vda-jax infer`, `eval` and streaming.
"""

from ml_collections import config_dict

from vda_jax.train.config import default_config


def get_config() -> config_dict.ConfigDict:
    c = default_config()
    c.model = config_dict.ConfigDict(dict(
        name="custom", embed_dim=64, depth=4, num_heads=2, intermediate_layers=(0, 1, 2, 3),
        features=32, out_channels=(32, 32, 64, 64), num_frames=32, pos_embed_grid=4))
    # A random encoder has nothing worth keeping frozen.
    c.train_encoder = True
    c.total_steps = 300
    c.batch_size = 4
    c.optimizer.lr = 1e-3
    c.optimizer.encoder_lr = 1e-3
    c.optimizer.warmup_steps = 20

    c.synthetic = config_dict.ConfigDict(dict(
        name="tiny", height=64, width=80, num_frames=24, num_videos=(48, 8, 0), seed=0, scene_kind=None))
    c.data.video_dataset = "vda_synthetic/tiny"
    c.data.clip_frames = 8
    c.data.clip_hop = 4
    c.data.crop_size = (56, 56)
    c.data.max_scale = 1.25
    c.data.read_threads = 2
    c.data.prefetch_batches = 2

    c.eval.every = 100
    c.eval.max_batches = 4
    c.checkpoint.every = 100
    c.log_every = 10
    return c
