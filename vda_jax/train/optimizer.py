"""AdamW with linear warm-up and cosine decay, global-norm clipping and per-group learning rates.

Parameters fall into three groups by path: ``encoder``, ``temporal`` (the head's temporal
layers) and ``head`` (the rest of the head). Each trained group gets its own AdamW with its
own peak learning rate; weight decay applies to kernels only.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import optax
from ml_collections import config_dict

GROUPS = ("encoder", "head", "temporal")


def _names(path: tuple) -> tuple:
    """The attribute / index names of a pytree path (dropping e.g. a Variable's ``.value``)."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_group(names: tuple) -> str:
    """The group of the parameter at ``names`` (its path from the model root)."""
    if names[0] == "encoder":
        return "encoder"
    return "temporal" if names[:2] == ("head", "temporal") else "head"


def group_labels(params):
    """The group name of every leaf of a parameter tree (an ``nnx.State``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(_names(path)), params)


def decay_mask(params):
    """True for kernels (matmul and convolution weights); biases, norms and embeddings are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[-1] == "kernel", params)


def learning_rates(config: config_dict.ConfigDict, total_steps: int) -> dict[str, optax.Schedule]:
    """The schedule of each group: linear warm-up from 0 to its peak, then cosine decay.

    Args:
      config: the ``optimizer`` section of the training config.
      total_steps: length of the schedule (warm-up included).
    """
    if not 0 <= config.warmup_steps < total_steps:
        raise ValueError(f"optimizer.warmup_steps {config.warmup_steps} must be in [0, total_steps {total_steps}); "
                         f"shorten the warm-up too, e.g. optimizer.warmup_steps={total_steps // 10}")
    peaks = {"head": config.lr, "encoder": config.encoder_lr,
             "temporal": config.lr if config.temporal_lr is None else config.temporal_lr}
    return {group: optax.warmup_cosine_decay_schedule(0.0, peak, config.warmup_steps, total_steps,
                                                      end_value=peak * config.end_lr_ratio)
            for group, peak in peaks.items()}


def make_optimizer(config: config_dict.ConfigDict, total_steps: int,
                   groups: Iterable[str]) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW per group.

    Args:
      config: the ``optimizer`` section of the training config.
      total_steps: length of the learning-rate schedules.
      groups: the groups being trained (the optimizer keeps state for these only).
    """
    schedules = learning_rates(config, total_steps)
    adamw = {group: optax.adamw(schedules[group], b1=config.b1, b2=config.b2, eps=config.eps,
                                weight_decay=config.weight_decay, mask=decay_mask)
             for group in groups}
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
    return optax.chain(clip, optax.multi_transform(adamw, group_labels))
