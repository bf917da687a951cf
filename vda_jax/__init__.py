"""vda-jax: Video Depth Anything in JAX/Flax.

Public API::

    model = vda_jax.load_checkpoint("checkpoints/vits")          # from `vda-jax convert`
    depth = model(frames)                                          # [B, T, H, W, 3] -> [B, T, H, W]
    depth = vda_jax.infer_video_depth(model, video, input_size=518)  # [N, H, W, 3] uint8 -> [N, H, W]
    stream = vda_jax.StreamingDepth(model); depth = stream.step(frame)
"""

import importlib

# Loaded on first use, so that the JAX-free runtime (``vda_jax.runtime``) imports without JAX.
_API = {
    "ModelConfig": "vda_jax.config", "config_from_json": "vda_jax.config", "model_config": "vda_jax.config",
    "load_checkpoint": "vda_jax.checkpoint", "save_model": "vda_jax.checkpoint",
    "StreamingDepth": "vda_jax.inference.stream", "stream_depth": "vda_jax.inference.stream",
    "VideoJob": "vda_jax.inference.video", "infer_video_depth": "vda_jax.inference.video",
    "infer_videos": "vda_jax.inference.video", "run_videos": "vda_jax.inference.video",
    "VideoDepthAnything": "vda_jax.models.vda",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vda_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]


__version__ = "0.1.0"
