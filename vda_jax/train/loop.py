"""The training loop behind ``vda-jax train``: data, sharded steps, evaluation, checkpoints, logs.

A run lives in its workdir::

    WORKDIR/config.json      the config of the latest start
    WORKDIR/metrics.jsonl    one JSON object per logged step and per evaluation
    WORKDIR/checkpoints/     orbax checkpoints (state + data position), latest and best
    WORKDIR/model/           the final model, loadable with ``vda_jax.checkpoint.load_checkpoint``
    WORKDIR/data/            the rendered synthetic dataset, when the config asks for one

Starting again in the same workdir resumes from its latest checkpoint. The first Ctrl-C
saves a checkpoint at the current step and stops; a non-finite loss stops the run without
saving, so the latest checkpoint stays the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import grain
import jax
import numpy as np
import optax
import tensorflow_datasets as tfds
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_dict
from tqdm import tqdm

from vda_jax.checkpoint import count_params, save_model
from vda_jax.data import builders, pipeline
from vda_jax.eval.metrics import depth_metrics
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.precision import compute_dtype
from vda_jax.train import sharding
from vda_jax.train.checkpoints import Checkpoints
from vda_jax.train.config import model_config_from
from vda_jax.train.init import initial_model
from vda_jax.train.metrics_log import MetricsLog, write_atomic
from vda_jax.train.optimizer import learning_rates, make_optimizer
from vda_jax.train.state import abstract_train_state, create_train_state, trainable, trained_groups
from vda_jax.train.step import StepOptions, jit_eval_step, jit_train_step, training_model

BATCH_KEYS = ("frames", "depth", "mask")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving."""


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """Yields "was Ctrl-C pressed?": the first SIGINT only sets the flag, a second one interrupts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum, frame):
        del signum, frame
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _metadata(name: str, split: str, data_dir: str | None) -> dict:
    """The metadata of a prepared TFDS dataset that has ``split``."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise ValueError(f"dataset {name} is not prepared in {builder.data_dir}; build it with "
                         "vda_jax.data.builders.prepare or set data.data_dir to where it is")
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return dict(builder.info.metadata or {})


def _metric_depth(metadata: Mapping, name: str) -> bool:
    kind = metadata.get("depth_kind", "metric")
    if kind not in ("metric", "disparity"):
        raise ValueError(f"{name}: unknown depth_kind {kind!r} in its metadata (expected 'metric' or 'disparity')")
    return kind == "metric"


class Trainer:
    """One training run in ``workdir``: builds (or restores) everything at construction.

    Attributes:
      state: the sharded ``nnx.State`` of a ``TrainState``.
      step: number of optimizer steps taken.
    """

    def __init__(self, config: config_dict.ConfigDict, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        if config.total_steps < 1 or config.log_every < 1 or config.checkpoint.every < 1:
            raise ValueError("total_steps, log_every and checkpoint.every must be >= 1")
        self.model_config = model_config_from(config.model)
        self.mesh = sharding.make_mesh(**config.mesh)

        self.data_config = self._data_config()
        metric_depth = self._metric_depth_by_kind()
        self._val_meta = _metadata(self.data_config.video_dataset, config.eval.split,
                                   self.data_config.data_dir) if config.eval.every else {}
        self._check_best_metric()
        # Each process reads its own part of the data and feeds its rows of every global batch.
        self._shard = grain.sharding.ShardOptions(jax.process_index(), jax.process_count(), drop_remainder=True)
        self.train_data = iter(pipeline.make_dataset(self.data_config, self._shard))

        tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
        self._learning_rate = learning_rates(config.optimizer, config.total_steps)["head"]
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpoints = Checkpoints(os.path.join(self.workdir, "checkpoints"), keep=config.checkpoint.keep,
                                       best_metric=config.checkpoint.best_metric,
                                       best_mode=config.checkpoint.best_mode)
        self._graphdef = self._restore_or_initialize(tx)

        options = {kind: StepOptions.from_config(config, metric) for kind, metric in metric_depth.items()}
        self._train_steps = {kind: jit_train_step(self._graphdef, opts, self.shardings, self.mesh)
                             for kind, opts in options.items()}
        self._eval_step = jit_eval_step(self._graphdef, options["video"], self.shardings, self.mesh)
        self.log = MetricsLog(os.path.join(self.workdir, "metrics.jsonl"), self.step)
        if jax.process_index() == 0:
            write_atomic(os.path.join(self.workdir, "config.json"), config.to_json(indent=2))

    def _restore_or_initialize(self, tx: optax.GradientTransformation) -> nnx.GraphDef:
        """Sets ``state``, ``step`` and ``shardings`` from the latest checkpoint or ``init_from``."""
        c = self.config
        latest = self.checkpoints.latest_step()
        if latest is None:
            model = initial_model(self.model_config, c.init_from, seed=c.seed, dtype=compute_dtype(c.precision))
        else:
            model = nnx.eval_shape(lambda: VideoDepthAnything(self.model_config, rngs=nnx.Rngs(0)))
        model = training_model(model, c.precision, self.mesh)
        graphdef, abstract = abstract_train_state(model, tx, train_encoder=c.train_encoder)
        self.shardings = sharding.state_shardings(abstract, self.mesh, c.sharding.tensor_rules,
                                                  c.sharding.min_fsdp_size)
        if latest is None:
            self.state = create_train_state(model, tx, train_encoder=c.train_encoder, shardings=self.shardings)
        else:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, self.shardings)
            self.state = self.checkpoints.restore(latest, target, self.train_data)
        self.step = latest or 0
        params = abstract["model"]
        trained = count_params(nnx.filter_state(params, trainable(c.train_encoder)))
        self._print(f"{f'resuming at step {self.step}' if self.step else 'starting'}: {self.model_config.name}, "
                    f"{trained:,} of {count_params(params):,} parameters trained, mesh {dict(self.mesh.shape)}, "
                    f"{jax.process_count()} process(es)")
        return graphdef

    def _data_config(self) -> pipeline.DataConfig:
        c = self.config
        processes = jax.process_count()
        for key in ("batch_size", "image_batch_size"):
            if c[key] % processes:
                raise ValueError(f"{key} {c[key]} must be a multiple of the {processes} processes")
        data_dir = c.data.data_dir
        if c.synthetic is not None:
            data_dir = data_dir or os.path.join(self.workdir, "data")
            self._prepare_synthetic(data_dir)
        return pipeline.DataConfig(**{**c.data.to_dict(), "data_dir": data_dir}, batch_size=c.batch_size // processes,
                                   image_batch_size=c.image_batch_size // processes, seed=c.seed)

    def _prepare_synthetic(self, data_dir: str) -> None:
        fields = self.config.synthetic.to_dict()
        name = fields.pop("name", None)
        if self.config.data.video_dataset != f"vda_synthetic/{name}":
            raise ValueError(f"synthetic.name {name!r} and data.video_dataset {self.config.data.video_dataset!r} "
                             f"disagree; set data.video_dataset='vda_synthetic/{name}'")
        if jax.process_index() == 0:
            builders.prepare(builders.VdaSynthetic, data_dir, config=builders.SyntheticConfig(name=name, **fields))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vda_synthetic prepared")

    def _metric_depth_by_kind(self) -> dict[str, bool]:
        """Per batch kind ("video", "image"): is its dataset's depth metric (else disparity)?"""
        d = self.data_config
        sources = {"video": d.video_dataset, **({"image": d.image_dataset} if d.image_ratio > 0 else {})}
        splits = {"video": d.video_split, "image": d.image_split}
        return {kind: _metric_depth(_metadata(name, splits[kind], d.data_dir), name) for kind, name in sources.items()}

    def _check_best_metric(self) -> None:
        available = ["val_loss", "val_spatial", "val_stable"]
        if self.config.eval.every and _metric_depth(self._val_meta, self.config.eval.split):
            available += ["val_abs_rel", "val_delta1"]
        if self.config.eval.every and self.config.checkpoint.best_metric not in available:
            raise ValueError(f"checkpoint.best_metric {self.config.checkpoint.best_metric!r} is not computed "
                             f"for this validation set; choose one of {available}")

    @property
    def model(self) -> VideoDepthAnything:
        """The model with the current parameters."""
        return nnx.merge(self._graphdef, self.state).model

    def _print(self, message: str) -> None:
        if jax.process_index() == 0:
            tqdm.write(message)

    def _flush(self, pending: list[tuple[int, int, dict]], since: float, bar: tqdm) -> None:
        """Fetches the metrics of the steps dispatched since ``since``, checks them and logs their means."""
        steps = [(step, examples, jax.device_get(metrics)) for step, examples, metrics in pending]
        seconds = time.perf_counter() - since  # the steps have finished: their metrics are here
        for step, _, metrics in steps:
            if not all(np.isfinite(v) for v in metrics.values()):
                self.checkpoints.wait()
                values = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} ({values}); stopped without saving, the last good checkpoint "
                    f"is step {self.checkpoints.latest_step()} in {self.checkpoints.directory}; "
                    "lower optimizer.lr or check the data")
        record = {"step": steps[-1][0]}
        record.update({k: float(np.mean([m[k] for _, _, m in steps])) for k in steps[-1][2]})
        record["lr"] = float(self._learning_rate(steps[-1][0] - 1))
        record["step_time"] = seconds / len(steps)
        record["clips_per_s"] = sum(examples for _, examples, _ in steps) / seconds
        self.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        step_s=f"{record['step_time']:.3f}", clips_s=f"{record['clips_per_s']:.1f}")
        if bar.disable:
            self._print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def run(self, until: int | None = None) -> None:
        """Trains up to step ``until`` (default and at most: ``total_steps``).

        Raises:
          NonFiniteLossError: the loss became NaN or infinite (nothing was saved after it).
          KeyboardInterrupt: after Ctrl-C, once the current step is checkpointed.
        """
        c = self.config
        until = c.total_steps if until is None else min(until, c.total_steps)
        start = self.step
        pending, last_saved = [], self.checkpoints.latest_step()
        bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (c.progress_bar and jax.process_index() == 0))
        with bar, _interrupt_flag() as interrupted:
            tick = time.perf_counter()
            while self.step < until and not interrupted():
                batch = next(self.train_data)
                kind = batch.pop("kind")
                arrays = sharding.global_batch({k: batch[k] for k in BATCH_KEYS}, self.mesh)
                self.state, metrics = self._train_steps[kind](self.state, arrays)
                self.step += 1
                pending.append((self.step, len(batch["frames"]) * jax.process_count(), metrics))
                bar.update()
                evaluate = bool(c.eval.every) and self.step % c.eval.every == 0
                save = evaluate or self.step % c.checkpoint.every == 0 or self.step == until
                if save or self.step % c.log_every == 0:
                    self._flush(pending, tick, bar)
                    pending = []
                if save:
                    self.checkpoints.save(self.step, self.state, self.train_data, self.evaluate() if evaluate else None)
                    last_saved = self.step
                if not pending:
                    tick = time.perf_counter()
            if interrupted():
                if pending:
                    self._flush(pending, tick, bar)
                if last_saved != self.step:
                    self.checkpoints.save(self.step, self.state, self.train_data)
                self.checkpoints.wait()
                self._print(f"interrupted: saved step {self.step} in {self.checkpoints.directory}; "
                            "run the same command again to resume")
                raise KeyboardInterrupt
        self.checkpoints.wait()
        if self.step == c.total_steps and self.step > start:
            self._export()

    def _export(self) -> None:
        """Writes the final model as a vda-jax model directory (single-process runs)."""
        if jax.process_count() > 1:  # save_model writes through a per-process temporary directory
            self._print(f"done: step {self.step}; the model is in the latest checkpoint")
            return
        path = os.path.join(self.workdir, "model")
        save_model(nnx.merge(self._graphdef, jax.device_get(self.state)).model, path, overwrite=True,
                   metadata={"trained_steps": self.step})
        self._print(f"done: step {self.step}; model saved to {path}")

    def evaluate(self) -> dict[str, float]:
        """Loss (and AbsRel / delta1 for metric ground truth) over the validation split."""
        c = self.config
        data_config = dataclasses.replace(self.data_config, video_split=c.eval.split, image_ratio=0.0, max_scale=1.0,
                                          flip_prob=0.0, color_jitter=0.0, num_epochs=1)
        metric = _metric_depth(self._val_meta, c.eval.split)
        max_depth = self._val_meta.get("max_depth") or np.inf
        totals: dict[str, float] = {}
        batches = 0
        for batch in pipeline.make_dataset(data_config, self._shard):
            if c.eval.max_batches and batches == c.eval.max_batches:
                break
            batches += 1
            pred, losses = self._eval_step(self.state, sharding.global_batch({k: batch[k] for k in BATCH_KEYS},
                                                                             self.mesh))
            scores = {f"val_{k}": float(v) for k, v in jax.device_get(losses).items()}
            scores["val_loss"] = scores.pop("val_total")
            if metric:
                scores.update(self._depth_metrics(pred, batch, max_depth))
            for k, v in scores.items():
                totals[k] = totals.get(k, 0.0) + v
        if not batches:
            raise ValueError(f"the {c.eval.split!r} split gave no batch of {data_config.batch_size} clips")
        results = {k: v / batches for k, v in totals.items()}
        self.log.write({"step": self.step, **results})
        self._print(f"step {self.step}: " + " ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    def _depth_metrics(self, pred: jax.Array, batch: Mapping[str, np.ndarray], max_depth: float) -> dict[str, float]:
        """Mean AbsRel and delta1 over the clips of a global batch that have valid ground truth."""
        local = np.asarray(multihost_utils.global_array_to_host_local_array(
            pred, self.mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES)))
        totals = np.zeros(3)  # abs_rel, delta1, clips
        for p, depth, mask in zip(local, batch["depth"], batch["mask"]):
            if mask.any():
                scores = depth_metrics(p, depth, max_depth=max_depth, mask=mask)
                totals += (scores["abs_rel"], scores["delta1"], 1)
        abs_rel, delta1, clips = multihost_utils.process_allgather(totals).reshape(-1, 3).sum(0)
        return {"val_abs_rel": abs_rel / clips, "val_delta1": delta1 / clips} if clips else {}

    def close(self) -> None:
        self.checkpoints.close()


def train(config: config_dict.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) training to ``config.total_steps`` in ``workdir``."""
    sharding.maybe_initialize_distributed()
    trainer = Trainer(config, workdir)
    try:
        trainer.run()
    finally:
        trainer.close()
