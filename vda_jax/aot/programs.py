"""vda-jax's programs lowered for a compile target, from shapes alone (nothing is allocated or run).

Each function returns a ``jax.stages.Traced`` (``.jaxpr`` for FLOP counts, ``.lower()``) whose
compilation runs the target's own compiler. The programs are the ones training and inference
run (``jit_train_step``, the window step, the streaming step), with the options their devices
imply (``vda_jax.devices.Platform``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections.config_dict import ConfigDict

from vda_jax.aot.targets import Target
from vda_jax.config import ModelConfig
from vda_jax.inference import stream, video
from vda_jax.models.vda import VideoDepthAnything, compute_model
from vda_jax.train import sharding
from vda_jax.train.config import model_config_from
from vda_jax.train.optimizer import make_optimizer
from vda_jax.train.state import abstract_train_state, trained_groups
from vda_jax.train.step import StepOptions, jit_train_step, training_model


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def train_mesh(config: ConfigDict, target: Target) -> Mesh:
    """The training mesh of ``config.mesh`` over the target's devices."""
    return sharding.make_mesh(**config.mesh, devices=target.devices)


def train_step(config: ConfigDict, target: Target, clip_frames: int | None = None) -> jax.stages.Traced:
    """The train step of a training config (``vda_jax.train.config``) on the target.

    Batches are ``config.batch_size`` clips of ``clip_frames`` (default ``config.data.clip_frames``)
    frames at ``config.data.crop_size``; ``clip_frames=1`` is the image step (``config.image_batch_size``).
    """
    mesh = train_mesh(config, target)
    model = nnx.eval_shape(lambda: training_model(VideoDepthAnything(model_config_from(config.model)),
                                                  config.precision, mesh))
    tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
    graphdef, abstract = abstract_train_state(model, tx, train_encoder=config.train_encoder)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.tensor_rules, config.sharding.min_fsdp_size)
    t = config.data.clip_frames if clip_frames is None else clip_frames
    b = config.image_batch_size if t == 1 else config.batch_size
    (h, w), placed = config.data.crop_size, sharding.batch_sharding(mesh)
    split_frames = config.sharding.split_frames and t > 1
    rows = (b * t,) if split_frames else (b, t)
    batch = {"frames": jax.ShapeDtypeStruct((*rows, h, w, 3), jnp.uint8, sharding=placed),
             "depth": jax.ShapeDtypeStruct((*rows, h, w), jnp.float32, sharding=placed),
             "mask": jax.ShapeDtypeStruct((*rows, h, w), jnp.bool_, sharding=placed)}
    options = StepOptions.from_config(config, frames_per_clip=t if split_frames else 0)
    return jit_train_step(graphdef, options, shardings, mesh).trace(_abstract(abstract, shardings), batch)


def _inference_params(config: ModelConfig, precision: str, devices) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: compute_model(VideoDepthAnything(config), precision, devices=devices))
    return nnx.split(model)


WINDOW_PARTS = ("encode", "decode")  # video.WindowPrograms


def window_step(config: ModelConfig, precision: str, frame_size: tuple[int, int], net_size: tuple[int, int],
                slots: int, target: Target, part: str) -> jax.stages.Traced:
    """One of the window step's two programs (``video.WindowPrograms``; ``part``: "encode" or
    "decode"): ``slots`` videos of ``frame_size`` over the target's devices (as many as there are
    slots, as ``vda-jax infer --batch-size``)."""
    mesh = video.slot_mesh(slots, target.devices)
    graphdef, params = _inference_params(config, precision, list(mesh.devices.flat))
    slots = video.padded_slots(slots, mesh)
    encode, decode = video.jitted_window_programs(graphdef, frame_size, net_size, mesh)
    shapes = video.window_inputs(graphdef, params, frame_size, net_size, slots)
    if part == "encode":
        return encode.trace(params, shapes.frames, shapes.first, shapes.real)
    if part == "decode":
        return decode.trace(params, shapes.state, shapes.encoded, shapes.first, shapes.real)
    raise ValueError(f"part must be one of {WINDOW_PARTS}, got {part!r}")


def stream_step(config: ModelConfig, precision: str, frame_size: tuple[int, int], net_size: tuple[int, int],
                target: Target) -> jax.stages.Traced:
    """One streaming step (a new frame over 31 cached ones) on the target's first device."""
    device = NamedSharding(jax.make_mesh((1,), ("data",), devices=target.devices[:1]), P())
    graphdef, params = _inference_params(config, precision, target.devices[:1])
    frame = jax.ShapeDtypeStruct((*frame_size, 3), jnp.uint8, sharding=device)
    params = _abstract(params, jax.tree.map(lambda _: device, params))
    state = stream.state_shapes(nnx.merge(graphdef, params), net_size)
    return stream._compiled(graphdef, net_size).trace(params, _abstract(state, jax.tree.map(lambda _: device, state)),
                                                      frame)


# jaxlib 0.10's XLA:GPU cannot tile some small Triton GEMM fusions with its untuned default
# configuration (INTERNAL "Couldn't find output tile sizes that satisfy ..."), which is what a
# compile without a GPU to autotune on uses; jaxlib 0.11 compiles the same programs.
_UNTILED_GEMM = "Couldn't find output tile sizes"
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def compile_for(lowered: jax.stages.Lowered, target: Target) -> tuple[jax.stages.Compiled, dict]:
    """``lowered.compile()``, and the compiler options it took: on CUDA targets whose Triton GEMM
    tiling fails (see ``_UNTILED_GEMM``), again with cuBLAS for every GEMM (``CUBLAS_GEMMS``)."""
    try:
        return lowered.compile(), {}
    except jax.errors.JaxRuntimeError as e:
        if target.platform.kind != "cuda" or _UNTILED_GEMM not in str(e):
            raise
    return lowered.compile(compiler_options=CUBLAS_GEMMS), CUBLAS_GEMMS
