"""Orbax checkpoints of a training run: the train state and the data-iterator position.

The state is stored as a flat ``{dotted path: array}`` dict (its ``nnx`` structure comes from
the code), which restores onto any mesh and any number of processes: the target's shardings
decide where the arrays go. The data position is the number of global batches taken (the same
on every process, see ``vda_jax.data.pipeline``), stored once as JSON, so a run saved by N
processes resumes on M with the same data order.
Orbax keeps the latest ``keep`` checkpoints plus the best one by an evaluation metric, and
writes arrays in the background while training continues.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from vda_jax import logs

# Orbax warns at each checkpoint saved without metrics when a best_fn is set; ours are saved between
# evaluations on purpose (the preservation policy keeps the best among the evaluated ones).
logs.drop("absl", "Requested `tracked_metric`; did not provide metrics.")

# Each replicated array is written by one device: orbax's default on CPU splits it into a
# slice per replica, which costs an eager slice per shard and replica at every save.
_REGISTRY = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))


def _is_array(value) -> bool:
    return hasattr(value, "shape")  # skips array-free placeholders such as optax's MaskedNode


def flat_arrays(state: nnx.State) -> dict[str, jax.Array]:
    """``{dotted path: array}`` of every array in ``state``."""
    return {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(state) if _is_array(v.get_value())}


def with_arrays(state: nnx.State, arrays: Mapping[str, jax.Array]) -> nnx.State:
    """``state`` with its arrays replaced by ``arrays`` (keyed as ``flat_arrays``)."""
    flat = []
    for path, v in nnx.to_flat_state(state):
        if _is_array(v.get_value()):
            v = v.replace(arrays[".".join(map(str, path))])
        flat.append((path, v))
    return nnx.from_flat_state(flat)


class Checkpoints:
    """The checkpoints of one run, in ``directory``."""

    def __init__(self, directory: str, *, keep: int, best_metric: str, best_mode: str):
        if best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")

        def best(metrics: Mapping[str, float]) -> float:
            return metrics[best_metric]

        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=best, n=1,
                                      reverse=best_mode == "min", keep_checkpoints_without_metrics=False),
        ])
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            # best_fn only makes orbax write the metrics next to each checkpoint (the policy decides).
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=best, best_mode=best_mode,
                                                 enable_async_checkpointing=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_REGISTRY),
                           "data": ocp.JsonCheckpointHandler()},
        )

    @staticmethod
    def exist(directory: str) -> bool:
        """Whether ``directory`` holds a checkpoint (without opening a manager, which would create the folder)."""
        return os.path.isdir(directory) and bool(ocp.utils.checkpoint_steps(directory))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best evaluation metric (None before any evaluation)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: nnx.State, data: grain.DatasetIterator,
             metrics: Mapping[str, float] | None = None) -> None:
        """Starts writing a checkpoint (arrays are written in the background)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(flat_arrays(state)), data=ocp.args.JsonSave(data.get_state())),
            metrics={k: float(v) for k, v in metrics.items()} if metrics else None)

    def restore(self, step: int, target: nnx.State, data: grain.DatasetIterator | None = None) -> nnx.State:
        """The state saved at ``step``, placed as ``target`` (abstract arrays with shardings).

        ``data``, when given, is moved to the saved position. ``target`` may be a part of the
        saved state (e.g. the model alone).
        """
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat_arrays(target).items()}
        items = {"state": ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract), partial_restore=True)}
        if data is not None:
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:  # orbax reports a mismatch in several ways
            raise ValueError(f"cannot restore step {step} from {self.directory}: it holds a different model or "
                             f"optimizer than this config, or was written by another version of vda-jax "
                             f"({str(e).splitlines()[0]}); use a new workdir") from e
        if data is not None:
            data.set_state(restored["data"])
        return with_arrays(target, restored["state"])

    def wait(self) -> None:
        """Blocks until background writes are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
