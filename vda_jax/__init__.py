"""vda-jax: Video Depth Anything in JAX/Flax.

Public API::

    model = vda_jax.from_pretrained("vits")                      # official weights by name (`vda-jax models`)
    model = vda_jax.load_checkpoint("checkpoints/vits")          # from `vda-jax convert`
    depth = model(frames)                                          # [B, T, H, W, 3] -> [B, T, H, W]
    depth = vda_jax.infer_video_depth(model, video, input_size=518)  # [N, H, W, 3] uint8 -> [N, H, W]
    stream = vda_jax.StreamingDepth(model); depth = stream.step(frame)
"""

import importlib

# Names load on first use (PEP 562), so `vda-jax` starts (and handles Ctrl-C) before jax is imported.
_EXPORTS = {
    "load_checkpoint": "vda_jax.checkpoint", "save_model": "vda_jax.checkpoint",
    "ModelConfig": "vda_jax.config", "config_from_json": "vda_jax.config", "model_config": "vda_jax.config",
    "StreamingDepth": "vda_jax.inference.stream", "stream_depth": "vda_jax.inference.stream",
    "VideoJob": "vda_jax.inference.video", "infer_video_depth": "vda_jax.inference.video",
    "infer_videos": "vda_jax.inference.video", "run_videos": "vda_jax.inference.video",
    "VideoDepthAnything": "vda_jax.models.vda", "from_pretrained": "vda_jax.pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vda_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"
