"""Video Depth Anything's training setting, for ``vits`` or ``vitl``: ``--config configs/train/paper.py:vitl``.

From the paper (arXiv:2501.12375) and the official code: the encoder is Depth Anything V2's
and stays frozen, only the spatio-temporal head trains; clips are 32 frames at 518x518;
videos with ground-truth depth are mixed with single images pseudo-labelled by a teacher
(trained with the spatial loss only); the loss weights are the official ``loss/loss.py``
defaults (gradient term 0.5 over 4 scales, temporal term x10).

Not verified against the paper's text here (written offline): the optimizer numbers follow
Depth Anything V2's fine-tuning recipe (arXiv:2406.09414: AdamW, decoder learning rate 5e-5,
encoder 10x lower), and the batch sizes, step count and image share are our choices for
8 GPUs of 80 GB. Start from the Depth Anything V2 checkpoint of the same size (by name, downloaded
from the Hugging Face Hub; or the path of its .pth):

    vda-jax train --config configs/train/paper.py:vits --workdir runs/vits \\
        init_from=dav2-vits data.data_dir=/data/tfds
"""

from ml_collections import config_dict

from vda_jax.train.config import default_config


def get_config(variant: str = "vits") -> config_dict.ConfigDict:
    if variant not in ("vits", "vitl"):
        raise ValueError(f"paper.py takes 'vits' or 'vitl', got {variant!r}")
    c = default_config()
    c.model.name = variant
    c.precision = "bf16"
    c.remat = True  # per-module remat: the vitl step fits 80 GB GPUs (scripts/memory_plan.py)
    c.frames_per_chunk = 8
    c.total_steps = 40_000
    c.batch_size = 16
    c.image_batch_size = 64
    c.optimizer.lr = 5e-5
    c.optimizer.encoder_lr = 5e-6
    c.optimizer.warmup_steps = 1000

    c.data.video_dataset = "vda_video_folder/default"
    c.data.image_dataset = "vda_pseudo_labels/default"
    c.data.image_ratio = 0.25
    c.data.clip_frames = 32
    c.data.crop_size = (518, 518)
    c.data.read_threads = 16
    c.data.prefetch_batches = 4

    c.eval.every = 2000
    c.eval.max_batches = 16
    c.checkpoint.every = 1000
    return c
