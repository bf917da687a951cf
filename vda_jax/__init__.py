"""vda-jax: Video Depth Anything in JAX/Flax.

Public API::

    model = vda_jax.load_checkpoint("checkpoints/vits")          # from `vda-jax convert`
    depth = model(frames)                                          # [B, T, H, W, 3] -> [B, T, H, W]
    depth = vda_jax.infer_video_depth(model, video, input_size=518)  # [N, H, W, 3] uint8 -> [N, H, W]
    stream = vda_jax.StreamingDepth(model); depth = stream.step(frame)
"""

from vda_jax.checkpoint import load_checkpoint, save_model
from vda_jax.config import ModelConfig, config_from_json, model_config
from vda_jax.inference.stream import StreamingDepth, stream_depth
from vda_jax.inference.video import VideoJob, infer_video_depth, infer_videos, run_videos
from vda_jax.models.vda import VideoDepthAnything

__all__ = [
    "ModelConfig", "StreamingDepth", "VideoDepthAnything", "VideoJob", "config_from_json", "infer_video_depth",
    "infer_videos", "load_checkpoint", "model_config", "run_videos", "save_model", "stream_depth",
]
__version__ = "0.1.0"
