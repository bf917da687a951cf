"""Per-device memory of the training and inference steps on accelerators, without one (not a test).

Compiles (never runs) the paper's train step and the inference window and stream steps for
vits and vitl on a simulated mesh of CPU devices, and reads XLA's memory analysis: per device,
the bytes of the arguments, the outputs and the temporaries. Nothing large is allocated
(parameters and batches are ``ShapeDtypeStruct``\\ s). CPU figures track the GPU's closely
(same XLA buffer assignment; GPU fusions differ in details).

  python scripts/memory_plan.py                 # the table
  python scripts/memory_plan.py --json          # a list of objects, one per configuration
  python scripts/memory_plan.py --only vitl:train batch_size=12    # one model:job, config overrides
"""

from __future__ import annotations

import os

DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vda_jax.config import model_config  # noqa: E402
from vda_jax.inference import stream, video, window  # noqa: E402
from vda_jax.inference.preprocess import network_size  # noqa: E402
from vda_jax.models.vda import VideoDepthAnything, compute_model, default_chunk_bytes  # noqa: E402
from vda_jax.train import sharding  # noqa: E402
from vda_jax.train.config import load_config, model_config_from  # noqa: E402
from vda_jax.train.optimizer import make_optimizer  # noqa: E402
from vda_jax.train.state import abstract_train_state, trained_groups  # noqa: E402
from vda_jax.train.step import StepOptions, jit_train_step, training_model  # noqa: E402

PAPER = pathlib.Path(__file__).resolve().parents[1] / "configs" / "train" / "paper.py"
FRAME_720P = (720, 1280)
GIB = 2**30


@dataclasses.dataclass
class Plan:
    """One compiled configuration and its per-device bytes."""

    model: str
    job: str
    precision: str
    batch: int
    frames: int
    height: int
    width: int
    devices: int
    arguments: int
    outputs: int
    temporaries: int
    compile_s: float

    @property
    def per_device_bytes(self) -> int:
        return self.arguments + self.outputs + self.temporaries

    def to_json(self) -> dict:
        keys = ("model", "job", "precision", "batch", "frames", "height", "width", "devices")
        return {**{k: getattr(self, k) for k in keys}, "per_device_bytes": self.per_device_bytes,
                "arguments_bytes": self.arguments, "outputs_bytes": self.outputs,
                "temporaries_bytes": self.temporaries, "compile_s": self.compile_s}


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _analyse(lowered: jax.stages.Lowered) -> tuple[int, int, int]:
    stats = lowered.compile().memory_analysis()
    # Donated arguments alias outputs: count those bytes once.
    outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    return stats.argument_size_in_bytes, outputs, stats.temp_size_in_bytes


def plan_train(variant: str, overrides: list[str]) -> Plan:
    """The paper's train step (``configs/train/paper.py:VARIANT`` with ``overrides``)."""
    config = load_config(f"{PAPER}:{variant}", overrides)
    mesh = sharding.make_mesh(**config.mesh)
    model = nnx.eval_shape(lambda: training_model(VideoDepthAnything(model_config_from(config.model)),
                                                  config.precision, mesh))
    tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
    graphdef, abstract = abstract_train_state(model, tx, train_encoder=config.train_encoder)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.tensor_rules, config.sharding.min_fsdp_size)
    options = StepOptions.from_config(config)
    b, t, (h, w) = config.batch_size, config.data.clip_frames, config.data.crop_size
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {"frames": jax.ShapeDtypeStruct((b, t, h, w, 3), jnp.uint8, sharding=batch_sharding),
             "depth": jax.ShapeDtypeStruct((b, t, h, w), jnp.float32, sharding=batch_sharding),
             "mask": jax.ShapeDtypeStruct((b, t, h, w), jnp.bool_, sharding=batch_sharding)}
    start = time.perf_counter()
    sizes = _analyse(jit_train_step(graphdef, options, shardings, mesh).lower(_abstract(abstract, shardings), batch))
    return Plan(variant, "train", config.precision, b, t, h, w, mesh.size, *sizes, time.perf_counter() - start)


def _abstract_params(variant: str, precision: str, mesh: jax.sharding.Mesh):
    """A GPU's inference model: XLA attention (cuDNN's needs less), the GPU's chunk budget."""
    model = nnx.eval_shape(lambda: compute_model(VideoDepthAnything(model_config(variant)), precision,
                                                 attention="xla", chunk_bytes=default_chunk_bytes("gpu")))
    graphdef, params = nnx.split(model)
    return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                 sharding=NamedSharding(mesh, P())), params)


def plan_window(variant: str, precision: str, slots: int, devices: int) -> Plan:
    """One window step of the long-video inference at 720p, ``slots`` videos on ``devices``."""
    mesh = video.slot_mesh(slots, jax.devices()[:devices])
    net_size = network_size(FRAME_720P, 518)
    graphdef, params = _abstract_params(variant, precision, mesh)
    init, _, step = video._compiled(graphdef, FRAME_720P, net_size, video.padded_slots(slots, mesh), mesh)
    state = jax.eval_shape(init, params)
    slot_axis = NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=slot_axis), state)
    frames = jax.ShapeDtypeStruct((state.reference.shape[0], window.STRIDE, *FRAME_720P, 3), jnp.uint8,
                                  sharding=slot_axis)
    first = jax.ShapeDtypeStruct((state.reference.shape[0],), jnp.bool_, sharding=slot_axis)
    start = time.perf_counter()
    sizes = _analyse(step.lower(params, state, frames, first))
    return Plan(variant, "window", precision, slots, window.WINDOW_FRAMES, *net_size, devices, *sizes,
                time.perf_counter() - start)


def plan_stream(variant: str, precision: str) -> Plan:
    """One streaming step (one new frame over 31 cached ones) at 720p on one device."""
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    net_size = network_size(FRAME_720P, 518)
    graphdef, params = _abstract_params(variant, precision, mesh)
    start_fn, step = stream._compiled(graphdef, net_size)
    frame = jax.ShapeDtypeStruct((*FRAME_720P, 3), jnp.uint8)
    state, _ = jax.eval_shape(start_fn, params, frame)
    start = time.perf_counter()
    sizes = _analyse(step.lower(params, state, frame))
    return Plan(variant, "stream", precision, 1, 1, *net_size, 1, *sizes, time.perf_counter() - start)


def _plans(variant: str, job: str, overrides: list[str]) -> list[Plan]:
    if job == "train":
        return [plan_train(variant, overrides)]
    if job == "window":  # (precision, videos, devices)
        return [plan_window(variant, *c) for c in (("fp32", 1, 1), ("bf16", 1, 1), ("bf16", 4, 1), ("bf16", 4, 4))]
    return [plan_stream(variant, p) for p in ("fp32", "bf16")]


def all_plans(only: str | None, overrides: list[str]):
    """Yields the plans of every configuration (or of ``only`` = "MODEL:JOB")."""
    for variant in ("vits", "vitl"):
        for job in ("train", "window", "stream"):
            if only is None or only == f"{variant}:{job}":
                yield from _plans(variant, job, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--only", help="one configuration group, MODEL:JOB, e.g. vitl:train")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args()
    plans = []
    if not args.json:
        print(f"{'model':5} {'job':6} {'prec':4} {'batch':>5} {'frames':>6} {'size':>9} {'dev':>3} "
              f"{'args GiB':>8} {'out GiB':>7} {'temp GiB':>8} {'total GiB':>9} {'compile s':>9}")
    for plan in all_plans(args.only, args.overrides):
        plans.append(plan)
        if not args.json:
            print(f"{plan.model:5} {plan.job:6} {plan.precision:4} {plan.batch:5} {plan.frames:6} "
                  f"{plan.height:4}x{plan.width:<4} {plan.devices:3} {plan.arguments / GIB:8.2f} "
                  f"{plan.outputs / GIB:7.2f} {plan.temporaries / GIB:8.2f} {plan.per_device_bytes / GIB:9.2f} "
                  f"{plan.compile_s:9.1f}", flush=True)
    if args.json:
        print(json.dumps([p.to_json() for p in plans], indent=1))


if __name__ == "__main__":
    main()
