"""The training and evaluation steps: pure functions of ``(graphdef, state, batch)``, jitted with shardings.

A batch is a dict of ``frames`` uint8 ``[B, T, H, W, 3]``, ``depth`` float32 ``[B, T, H, W]``
(0 where invalid) and ``mask`` bool ``[B, T, H, W]``. Clips (T >= 2) train with the video
loss, images (T = 1) with the spatial loss alone. The model predicts relative disparity, so
metric depth is inverted first; pseudo-labels already are disparity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections.config_dict import ConfigDict

from vda_jax.models import partitioning
from vda_jax.models.vda import VideoDepthAnything, compute_model, with_options
from vda_jax.ops.normalize import normalize
from vda_jax.train import losses
from vda_jax.train.sharding import batch_sharding, logical_rules, replicated
from vda_jax.train.state import TrainState, trainable
from vda_jax.xla_options import compiler_options

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of the steps (changing one recompiles).

    Attributes:
      train_encoder: differentiate through the encoder too (else it runs outside autodiff).
      remat: rematerialise per module: each temporal layer, each fusion block, each chunk of
        the head's per-frame end and, when the encoder trains, each ViT block keep only their
        inputs for the backward pass and recompute the rest there (one more forward pass of
        the trained parts; gradients are unchanged).
      frames_per_chunk: frames (per device) the per-frame parts (the encoder, the head's
        finest layers) run at a time; 0 runs all frames at once. With ``remat``, only a
        chunk's activations are live at a time in the backward pass too.
      metric_depth: the batches' depth is metric z-depth (trained on as 1 / depth); False
        when it is already relative disparity.
      alpha, scales, trim, stable_scale: of ``losses.video_depth_loss``.
      clip_groups: compute the loss on this many equal groups of clips separately and average
        it (``losses.per_group``), as the official per-GPU loss: trimming then sorts each
        group's residuals on its devices rather than the whole batch's.
      frames_per_clip: 0 when batches are clips ``[B, T, ...]`` split over devices by clip;
        T when they are frames ``[B*T, ...]`` of T-frame clips split by frame
        (``sharding.global_batch(..., split_frames=True)``), for more devices than clips.
    """

    train_encoder: bool = False
    remat: bool = False
    frames_per_chunk: int = 0
    metric_depth: bool = True
    alpha: float = 0.5
    scales: int = 4
    trim: float = 0.0
    stable_scale: float = 10.0
    clip_groups: int = 1
    frames_per_clip: int = 0

    @classmethod
    def from_config(cls, config: ConfigDict, metric_depth: bool = True, frames_per_clip: int = 0) -> StepOptions:
        """The options a training config (``vda_jax.train.config``) sets."""
        return cls(train_encoder=config.train_encoder, remat=config.remat, frames_per_chunk=config.frames_per_chunk,
                   metric_depth=metric_depth, frames_per_clip=frames_per_clip, **config.loss)

    def __post_init__(self):
        if self.frames_per_chunk < 0:
            raise ValueError(f"frames_per_chunk must be >= 0 (0: all frames at once), got {self.frames_per_chunk}")


def training_model(model: VideoDepthAnything, precision: str, mesh: Mesh) -> VideoDepthAnything:
    """``model`` (parameters shared) computing at ``precision`` on batches split over ``mesh``'s batch axes."""
    return with_options(compute_model(model, precision, devices=mesh.devices.flat), frame_sharding=batch_sharding(mesh))


def disparity_target(depth: jax.Array, mask: jax.Array, metric_depth: bool) -> jax.Array:
    """The training target: ``1 / depth`` on valid pixels (0 elsewhere) for metric depth."""
    if not metric_depth:
        return depth
    return jnp.where(mask, 1.0 / jnp.where(mask, depth, 1.0), 0.0)


def depth_losses(pred: jax.Array, batch: Batch, opts: StepOptions) -> Metrics:
    """``{"spatial", "stable", "total"}`` of a prediction ``[B, T, H, W]`` against the batch."""
    mask = batch["mask"]
    target = disparity_target(batch["depth"], mask, opts.metric_depth)
    kwargs = dict(alpha=opts.alpha, scales=opts.scales, trim=opts.trim)
    if pred.shape[1] == 1:
        loss = losses.image_depth_loss
    else:
        loss = functools.partial(losses.video_depth_loss, stable_scale=opts.stable_scale)
    return losses.per_group(loss, opts.clip_groups)(pred, target, mask, **kwargs)


def clips(batch: Batch, opts: StepOptions) -> Batch:
    """The batch as clips ``[B, T, ...]`` (frames ``[B*T, ...]`` regrouped by ``opts.frames_per_clip``)."""
    if opts.frames_per_clip:
        batch = {k: v.reshape(-1, opts.frames_per_clip, *v.shape[1:]) for k, v in batch.items()}
    chex.assert_rank(batch["frames"], 5)
    return batch


def loss_and_grads(model: VideoDepthAnything, batch: Batch, opts: StepOptions) -> tuple[Metrics, nnx.State]:
    """The loss terms of one batch and the gradients of its total for the trained parameters."""
    batch = clips(batch, opts)
    b, t, h, w, c = batch["frames"].shape
    frames = normalize(batch["frames"]).reshape(b * t, h, w, c)
    chunk = opts.frames_per_chunk or None
    # A frozen encoder runs outside the differentiated function: no gradients, no saved activations.
    features = None if opts.train_encoder else model.encode(frames, chunk)

    def loss_fn(model):
        encoded = model.encode(frames, chunk, opts.remat) if features is None else features
        pred = model.decode(encoded, t, (h, w), frames_per_chunk=chunk, remat=opts.remat)[0]
        terms = depth_losses(pred, batch, opts)
        return terms["total"], terms

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable(opts.train_encoder)), has_aux=True)
    (_, terms), grads = grad_fn(model)
    return terms, grads


def train_step(graphdef: nnx.GraphDef, opts: StepOptions, state: nnx.State, batch: Batch) -> tuple[nnx.State, Metrics]:
    """One optimizer step on one batch; returns the new state and the loss terms and gradient norm."""
    train_state: TrainState = nnx.merge(graphdef, state)
    terms, grads = loss_and_grads(train_state.model, batch, opts)
    train_state.optimizer.update(train_state.model, grads)
    metrics = {"loss": terms["total"], "spatial": terms["spatial"], "stable": terms["stable"],
               "grad_norm": optax.tree.norm(grads)}
    return nnx.state(train_state), metrics


def eval_step(graphdef: nnx.GraphDef, opts: StepOptions, state: nnx.State, batch: Batch) -> tuple[jax.Array, Metrics]:
    """The prediction (relative disparity) and the loss terms of one batch.

    The prediction is laid out as the batch: ``[B, T, H, W]``, or frames ``[B*T, H, W]``
    with ``opts.frames_per_clip``.
    """
    model = nnx.merge(graphdef, state).model
    clip_batch = clips(batch, opts)
    pred = model(normalize(clip_batch["frames"]))
    return pred.reshape(batch["depth"].shape), depth_losses(pred, clip_batch, opts)


def _on_mesh(mesh: Mesh, opts: StepOptions, fn: Callable) -> Callable:
    """``fn`` traced with the layers' logical axes mapped onto ``mesh`` (``sharding.logical_rules``)."""
    rules = logical_rules(split_frames=opts.frames_per_clip > 0)

    @functools.wraps(fn)
    def wrapped(*args):
        with partitioning.axis_rules(mesh, rules):
            return fn(*args)

    return wrapped


def jit_train_step(graphdef: nnx.GraphDef, opts: StepOptions, shardings: nnx.State,
                   mesh: Mesh) -> Callable[[nnx.State, Batch], tuple[nnx.State, Metrics]]:
    """``train_step`` compiled for states placed by ``shardings``; the input state is donated."""
    return jax.jit(_on_mesh(mesh, opts, functools.partial(train_step, graphdef, opts)),
                   in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler_options())


def jit_eval_step(graphdef: nnx.GraphDef, opts: StepOptions, shardings: nnx.State,
                  mesh: Mesh) -> Callable[[nnx.State, Batch], tuple[jax.Array, Metrics]]:
    """``eval_step`` compiled for states placed by ``shardings``; predictions stay batch-sharded."""
    return jax.jit(_on_mesh(mesh, opts, functools.partial(eval_step, graphdef, opts)),
                   in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(batch_sharding(mesh), replicated(mesh)), compiler_options=compiler_options())
