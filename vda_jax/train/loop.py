"""The training loop behind ``vda-jax train``: data, sharded steps, evaluation, checkpoints, logs.

A run lives in its workdir::

    WORKDIR/config.json      the config of the latest start
    WORKDIR/metrics.jsonl    one JSON object per logged step and per evaluation
    WORKDIR/checkpoints/     orbax checkpoints (state + data position), latest and best
    WORKDIR/model/           the final model, loadable with ``vda_jax.checkpoint.load_checkpoint``
    WORKDIR/data/            the rendered synthetic dataset, when the config asks for one

Starting again in the same workdir resumes from its latest checkpoint, on any number of
processes (the global batches do not depend on it). SIGTERM or the first Ctrl-C, on any
process, makes every process save a checkpoint at the same step and stop
(``vda_jax.train.coordination``); a non-finite loss stops the run without saving, so the latest
checkpoint stays the last good one. In a multi-process run an error on one process ends all of
them. The workdir must be on a file system that every process sees.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

import grain
import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_dict
from tqdm import tqdm

from vda_jax.checkpoint import FORMAT as MODEL_FORMAT
from vda_jax.checkpoint import check_model_output, count_params, save_model
from vda_jax.data import builders, pipeline
from vda_jax.eval.metrics import depth_metrics
from vda_jax.io.json_file import read_json
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.precision import compute_dtype
from vda_jax.train import coordination, sharding
from vda_jax.train.checkpoints import Checkpoints
from vda_jax.train.config import DEPTH_METRICS, LOSS_METRICS, model_config_from, validate
from vda_jax.train.init import initial_model
from vda_jax.train.metrics_log import MetricsLog, write_atomic
from vda_jax.train.optimizer import learning_rates, make_optimizer
from vda_jax.train.state import abstract_train_state, create_train_state, trainable, trained_groups
from vda_jax.train.step import StepOptions, jit_eval_step, jit_train_step, training_model

BATCH_KEYS = ("frames", "depth", "mask")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving."""




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
        validate(config)
        self.model_config = model_config_from(config.model)
        checkpoint_dir = os.path.join(self.workdir, "checkpoints")
        self.mesh = sharding.make_mesh(**config.mesh)  # sizes that do not fit the devices fail before any work
        # A first start reads its initial weights before the data: a wrong init_from fails before any is rendered.
        initial = None if Checkpoints.exist(checkpoint_dir) else initial_model(
            self.model_config, config.init_from, seed=config.seed, dtype=compute_dtype(config.precision))
        # This process reads its rows of every global batch: the block its devices hold.
        self._shard = grain.sharding.ShardOptions(*sharding.process_rows(self.mesh))
        # Processes that feed the same block (they differ along "tensor") count its scores once.
        blocks = multihost_utils.process_allgather(np.array([self._shard.shard_index])).ravel()
        self._first_reader = int(np.flatnonzero(blocks == self._shard.shard_index)[0]) == jax.process_index()
        self.data_config = self._data_config()
        metric_depth = self._metric_depth_by_kind()
        self._val_meta = builders.open_split(self.data_config.video_dataset, config.eval.split,
                                             self.data_config.data_dir)[1] if config.eval.every else {}
        self._check_best_metric()
        self.train_data = iter(pipeline.make_dataset(self.data_config, self._shard))
        if config.eval.every:  # refuses a validation split of less than a batch now, not after training
            pipeline.make_dataset(self._eval_data_config(), self._shard)

        tx = make_optimizer(config.optimizer, config.total_steps, trained_groups(config.train_encoder))
        self._learning_rate = learning_rates(config.optimizer, config.total_steps)["head"]
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpoints = Checkpoints(checkpoint_dir, keep=config.checkpoint.keep,
                                       best_metric=config.checkpoint.best_metric,
                                       best_mode=config.checkpoint.best_mode)
        self._graphdef = self._restore_or_initialize(tx, initial)

        # With sharding.split_frames, batches are frames [B*T, ...] of clips of T frames (images: T = 1).
        frames = {"video": self.data_config.clip_frames, "image": 1} if config.sharding.split_frames else {}
        options = {kind: StepOptions.from_config(config, metric, frames_per_clip=frames.get(kind, 0))
                   for kind, metric in metric_depth.items()}
        self._train_steps = {kind: jit_train_step(self._graphdef, opts, self.shardings, self.mesh)
                             for kind, opts in options.items()}
        self._eval_step = jit_eval_step(self._graphdef, options["video"], self.shardings, self.mesh)
        self.log = MetricsLog(os.path.join(self.workdir, "metrics.jsonl"), self.step)
        if jax.process_index() == 0:
            write_atomic(os.path.join(self.workdir, "config.json"), config.to_json(indent=2))

    def _restore_or_initialize(self, tx: optax.GradientTransformation,
                               initial: VideoDepthAnything | None) -> nnx.GraphDef:
        """Sets ``state``, ``step`` and ``shardings`` from the latest checkpoint, or from ``initial``
        (the model of ``init_from``) when there is none."""
        c = self.config
        latest = None if initial is not None else self.checkpoints.latest_step()
        if latest is None:
            model = initial if initial is not None else initial_model(
                self.model_config, c.init_from, seed=c.seed, dtype=compute_dtype(c.precision))
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
        blocks = self._shard.shard_count
        for key in ("batch_size", "image_batch_size"):
            if c[key] % blocks:
                raise ValueError(f"{key} {c[key]} must be a multiple of {blocks}: the processes feed equal "
                                 "row blocks of every batch")
        data_dir = c.data.data_dir
        if c.synthetic is not None:
            data_dir = data_dir or os.path.join(self.workdir, "data")
            self._prepare_synthetic(data_dir)
        return pipeline.DataConfig(**{**c.data.to_dict(), "data_dir": data_dir}, batch_size=c.batch_size,
                                   image_batch_size=c.image_batch_size, seed=c.seed)

    def _prepare_synthetic(self, data_dir: str) -> None:
        fields = self.config.synthetic.to_dict()
        name = fields.pop("name", None)
        if jax.process_index() == 0:
            builders.prepare(builders.VdaSynthetic, data_dir, config=builders.SyntheticConfig(name=name, **fields))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vda_synthetic prepared")

    def _metric_depth_by_kind(self) -> dict[str, bool]:
        """Per batch kind ("video", "image"): is its dataset's depth metric (else disparity)?"""
        d = self.data_config
        sources = {"video": d.video_dataset, **({"image": d.image_dataset} if d.image_ratio > 0 else {})}
        splits = {"video": d.video_split, "image": d.image_split}
        return {kind: _metric_depth(builders.open_split(name, splits[kind], d.data_dir)[1], name)
                for kind, name in sources.items()}

    def _check_best_metric(self) -> None:
        available = [*LOSS_METRICS]
        if self.config.eval.every and _metric_depth(self._val_meta, self.config.eval.split):
            available += DEPTH_METRICS
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
          coordination.Interrupted: after SIGINT / SIGTERM (on any process), once every process
            has checkpointed the same step.
        """
        c = self.config
        until = c.total_steps if until is None else min(until, c.total_steps)
        start = self.step
        pending, last_saved = [], self.checkpoints.latest_step()
        bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (c.progress_bar and jax.process_index() == 0))
        with bar, coordination.StopSignals() as signals:
            tick = time.perf_counter()
            while self.step < until and not (stopped := signals.should_stop(self.step)):
                batch = next(self.train_data)
                kind = batch.pop("kind")
                arrays = sharding.global_batch({k: batch[k] for k in BATCH_KEYS}, self.mesh,
                                               split_frames=c.sharding.split_frames)
                self.state, metrics = self._train_steps[kind](self.state, arrays)
                self.step += 1
                pending.append((self.step, c.batch_size if kind == "video" else c.image_batch_size, metrics))
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
            if self.step < until and stopped:
                if pending:
                    self._flush(pending, tick, bar)
                if last_saved != self.step:
                    self.checkpoints.save(self.step, self.state, self.train_data)
                self.checkpoints.wait()
                self._print(f"stopped by a signal: saved step {self.step} in {self.checkpoints.directory}; "
                            "run the same command again to resume")
                raise coordination.Interrupted(signals.stop_signal, self.step)
        self.checkpoints.wait()
        if self.step == c.total_steps and self.step > start:
            self._export()

    def _export(self) -> None:
        """Writes the final model as a vda-jax model directory (every process takes part)."""
        path = os.path.join(self.workdir, "model")
        save_model(self.model, path, overwrite=True, metadata={"trained_steps": self.step})
        self._print(f"done: step {self.step}; model saved to {path}")

    def _eval_data_config(self) -> pipeline.DataConfig:
        """One pass over the validation split, unaugmented."""
        return dataclasses.replace(self.data_config, video_split=self.config.eval.split, image_ratio=0.0,
                                   max_scale=1.0, flip_prob=0.0, color_jitter=0.0, num_epochs=1)

    def evaluate(self) -> dict[str, float]:
        """Loss (and AbsRel / delta1 for metric ground truth) over the validation split."""
        c = self.config
        data_config = self._eval_data_config()
        metric = _metric_depth(self._val_meta, c.eval.split)
        max_depth = self._val_meta.get("max_depth") or np.inf
        totals: dict[str, float] = {}
        batches = 0
        for batch in pipeline.make_dataset(data_config, self._shard):
            if c.eval.max_batches and batches == c.eval.max_batches:
                break
            batches += 1
            pred, losses = self._eval_step(self.state, sharding.global_batch(
                {k: batch[k] for k in BATCH_KEYS}, self.mesh, split_frames=c.sharding.split_frames))
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
            pred, self.mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))).reshape(np.shape(batch["depth"]))
        totals = np.zeros(3)  # abs_rel, delta1, clips
        for p, depth, mask in zip(local, batch["depth"], batch["mask"]):
            if mask.any():
                scores = depth_metrics(p, depth, max_depth=max_depth, mask=mask)
                totals += (scores["abs_rel"], scores["delta1"], 1)
        abs_rel, delta1, clips = multihost_utils.process_allgather(totals * self._first_reader).reshape(-1, 3).sum(0)
        return {"val_abs_rel": float(abs_rel / clips), "val_delta1": float(delta1 / clips)} if clips else {}

    def close(self) -> None:
        self.checkpoints.close()


def train(config: config_dict.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) training to ``config.total_steps`` in ``workdir``, on every process of the job."""
    sharding.maybe_initialize_distributed()
    with coordination.fail_together():
        trainer = Trainer(config, workdir)
        try:
            trainer.run()
        finally:
            trainer.close()


def model_from_checkpoint(workdir: str, output_dir: str, *, step: str | int = "best", overwrite: bool = False) -> int:
    """Writes the model of a training checkpoint of ``workdir`` as a model directory.

    Args:
      step: "best" (by the run's ``checkpoint.best_metric``; the latest when no checkpoint has
        been evaluated), "latest", or a step number.
    Returns:
      The step written.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{workdir} is not a training workdir: it has no config.json")
    config = read_json(config_path, "give a workdir that vda-jax train wrote")
    if not isinstance(config, dict) or "checkpoint" not in config:
        ours = isinstance(config, dict) and config.get("format") == MODEL_FORMAT
        raise ValueError(f"{workdir} is " + ("a model directory already; use it as it is (e.g. --checkpoint "
                                             f"{workdir})" if ours else "not a training workdir"))
    config = config_dict.ConfigDict(config)
    check_model_output(output_dir, overwrite=overwrite)  # before the restore
    c, folder = config.checkpoint, os.path.join(workdir, "checkpoints")
    if not Checkpoints.exist(folder):  # asked before a manager opens it (which would create the folder)
        raise ValueError(f"{workdir} has no checkpoint yet")
    checkpoints = Checkpoints(folder, keep=c.keep, best_metric=c.best_metric, best_mode=c.best_mode)
    try:
        steps = checkpoints.all_steps()
        if step in ("best", "latest"):
            chosen = (checkpoints.best_step() if step == "best" else None) or checkpoints.latest_step()
        elif str(step).isdigit() and int(step) in steps:
            chosen = int(step)
        else:
            raise ValueError(f"step must be 'best', 'latest' or one of the kept steps {steps}, got {step!r}")
        model = nnx.eval_shape(lambda: VideoDepthAnything(model_config_from(config.model), rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(model)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = nnx.State({"model": jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)})
        params = checkpoints.restore(chosen, target)["model"]
    finally:
        checkpoints.close()
    save_model(nnx.merge(graphdef, params), output_dir, overwrite=overwrite,
               metadata={"trained_steps": chosen, "workdir": os.path.abspath(workdir)})
    return chosen
