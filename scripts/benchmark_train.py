"""Speed of the training step (not a test).

Times the jitted, sharded train step of a training config on random batches of the config's
shape (no input pipeline, randomly initialised model): compile time, steady-state step time
(median) and clips/s, and the peak device memory where the backend reports it.

  python scripts/benchmark_train.py                       # configs/train/synthetic_tiny.py, on CPU
  python scripts/benchmark_train.py --paper vitl          # the paper's setting, on a GPU
  python scripts/benchmark_train.py --steps 50 batch_size=8 train_encoder=False remat=True
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np
from flax import nnx

from vda_jax.models.vda import VideoDepthAnything
from vda_jax.precision import compute_dtype
from vda_jax.train import sharding
from vda_jax.train.config import load_config, model_config_from
from vda_jax.train.optimizer import make_optimizer
from vda_jax.train.state import abstract_train_state, create_train_state, trained_groups
from vda_jax.train.step import StepOptions, jit_train_step, training_model

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "train"


def random_batch(rng: np.random.Generator, batch: int, frames: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    shape = (batch, frames, *size)
    return {"frames": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
            "depth": rng.uniform(0.5, 20.0, shape).astype(np.float32),
            "mask": rng.random(shape) > 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIGS / "synthetic_tiny.py"))
    parser.add_argument("--paper", choices=("vits", "vitl"), help="use configs/train/paper.py:VARIANT")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first (compiling) one")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    config = load_config(f"{CONFIGS / 'paper.py'}:{args.paper}" if args.paper else args.config, args.overrides)

    mesh = sharding.make_mesh(**config.mesh)
    model = VideoDepthAnything(model_config_from(config.model), rngs=nnx.Rngs(config.seed),
                               dtype=compute_dtype(config.precision))
    model = training_model(model, config.precision, mesh)
    tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
    graphdef, abstract = abstract_train_state(model, tx, train_encoder=config.train_encoder)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.tensor_rules, config.sharding.min_fsdp_size)
    state = create_train_state(model, tx, train_encoder=config.train_encoder, shardings=shardings)
    del model
    options = StepOptions.from_config(config)
    step = jit_train_step(graphdef, options, shardings, mesh)

    rng = np.random.default_rng(0)
    batches = [sharding.global_batch(random_batch(rng, config.batch_size, config.data.clip_frames,
                                                  tuple(config.data.crop_size)), mesh) for _ in range(2)]
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    memory = jax.devices()[0].memory_stats() or {}
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "model": config.model.name, "precision": config.precision, "train_encoder": config.train_encoder,
        "remat": config.remat, "batch": [config.batch_size, config.data.clip_frames, *config.data.crop_size],
        "compile_and_first_step_s": round(compile_s, 2), "step_s_median": round(step_s, 4),
        "step_s_min": round(min(times), 4), "clips_per_s": round(config.batch_size / step_s, 2),
        "frames_per_s": round(config.batch_size * config.data.clip_frames / step_s, 1),
        "peak_device_gib": round(memory["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in memory else None,
        "final_loss": float(metrics["loss"]),
    }))


if __name__ == "__main__":
    main()
