"""The train state: the model and an optimizer over its trainable parameters."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from vda_jax.models.vda import VideoDepthAnything
from vda_jax.train.optimizer import GROUPS
from vda_jax.train.sharding import place


def _in_head(path: tuple, value) -> bool:
    del value
    return path[0] == "head"


def trainable(train_encoder: bool) -> nnx.filterlib.Filter:
    """The parameters that train: the head's, or every parameter with ``train_encoder``."""
    return nnx.Param if train_encoder else nnx.All(nnx.Param, _in_head)


def trained_groups(train_encoder: bool) -> tuple[str, ...]:
    """The optimizer's parameter groups (``vda_jax.train.optimizer``) that train."""
    return GROUPS if train_encoder else tuple(g for g in GROUPS if g != "encoder")


class TrainState(nnx.Module):
    """What a training step reads and updates; ``nnx.split`` of it is the step's carry.

    The optimizer's ``wrt`` filter is the trainable filter, so frozen parameters have no
    optimizer state and are never touched by updates.
    """

    def __init__(self, model: VideoDepthAnything, tx: optax.GradientTransformation, *, train_encoder: bool):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=trainable(train_encoder))


def abstract_train_state(model: VideoDepthAnything, tx: optax.GradientTransformation, *,
                         train_encoder: bool) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and ``ShapeDtypeStruct`` state of ``model``'s train state (``model`` may be abstract)."""
    abstract = nnx.eval_shape(lambda m: TrainState(m, tx, train_encoder=train_encoder), model)
    return nnx.split(abstract)


def create_train_state(model: VideoDepthAnything, tx: optax.GradientTransformation, *, train_encoder: bool,
                       shardings: nnx.State) -> nnx.State:
    """The train state of ``model``, placed by ``shardings`` (optimizer state created on the devices)."""
    model_graphdef, params = nnx.split(model)

    def create(params: nnx.State) -> nnx.State:
        return nnx.state(TrainState(nnx.merge(model_graphdef, params), tx, train_encoder=train_encoder))

    return jax.jit(create, out_shardings=shardings)(place(params, shardings["model"]))
