"""Device mesh, placement rules for parameters and optimizer state, and batch sharding.

The mesh has three axes: ``data`` (batch only), ``fsdp`` (batch, and every large array
split along its largest dimension that the axis divides) and ``tensor`` (dimensions chosen
by regex rules on the variable path, Megatron style). Optimizer moments live under paths
that end with their parameter's path, so the same rules place them like their parameters.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the dotted variable path, mesh axis or None for each dimension).
Rule = tuple[str, Sequence[str | None]]

# Megatron-style tensor parallelism for the ViT and the temporal layers: the first matmul of
# each pair is split over its output features (heads), the second over its input features.
# Fused projections ([in, parts, out]: q/k/v, GEGLU value/gate) split `out`, never the parts.
# The layers gather parameters at use by the same axes (LOGICAL_RULES: "heads", "mlp").
TENSOR_RULES: tuple[Rule, ...] = (
    (r"attn\.qkv\.kernel$", (None, None, "tensor")),
    (r"attn\.qkv\.bias$", (None, "tensor")),
    (r"attn\.proj\.kernel$", ("tensor", None)),
    (r"mlp\.fc1\.kernel$", (None, "tensor")),
    (r"mlp\.fc1\.bias$", ("tensor",)),
    (r"mlp\.fc2\.kernel$", ("tensor", None)),
    (r"to_[qkv]\.kernel$", (None, "tensor")),
    (r"to_out\.kernel$", ("tensor", None)),
    (r"ff\.proj\.kernel$", (None, None, "tensor")),
    (r"ff\.proj\.bias$", (None, "tensor")),
    (r"ff\.out\.kernel$", ("tensor", None)),
)

# The layers' logical axis names (vda_jax.models.partitioning) -> mesh axes, for the steps'
# traces. Parameters are gathered at use to "heads" / "mlp" only (FSDP shards never reach a
# matmul); "frames" is the per-frame batch axis (B*T) of the encoder and head; in the temporal
# layers the same axis is "clips" (split only by whole clips) and spatial positions "space".
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "heads": "tensor", "mlp": "tensor", "frames": BATCH_AXES, "clips": BATCH_AXES, "space": None}


def logical_rules(split_frames: bool) -> dict[str, str | tuple[str, ...] | None]:
    """``LOGICAL_RULES``; with ``split_frames`` (a clip's frames on several devices) the temporal
    layers split spatial positions over the batch axes instead of clips."""
    return {**LOGICAL_RULES, "clips": None, "space": BATCH_AXES} if split_frames else LOGICAL_RULES


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the launcher describes one.

    Either ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are set,
    or a SLURM / Open MPI launch with more than one task (JAX reads those itself). A single
    process does nothing.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                             "integers too") from e
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes (data, fsdp, tensor) must be positive with at most one -1, got {tuple(sizes)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into a mesh of {tuple(sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but there are "
                         f"{len(devices)}; set one of mesh.data/fsdp/tensor to -1")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = (),
                   min_fsdp_size: int = 0) -> P:
    """Where an array of ``shape`` at the dotted ``path`` lives.

    The first rule whose regex matches assigns mesh axes to dimensions (an axis that does not
    divide its dimension is dropped); then, for arrays of at least ``min_fsdp_size``
    elements, the largest dimension still free that ``fsdp`` divides is split over ``fsdp``.
    """
    spec: list[str | None] = [None] * len(shape)
    for pattern, axes in rules:
        if re.search(pattern, path):
            if len(axes) != len(shape):
                raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes for {path} of shape "
                                 f"{tuple(shape)}")
            spec = [a if a is None or dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape)]
            break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and math.prod(shape) >= min_fsdp_size:
        free = [i for i, dim in enumerate(shape) if spec[i] is None and dim % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[Rule] = (), min_fsdp_size: int = 0) -> nnx.State:
    """A ``NamedSharding`` for every variable of ``state`` (arrays or ``ShapeDtypeStruct``)."""
    flat = []
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        if hasattr(value, "shape"):  # not an array-free placeholder such as optax's MaskedNode
            spec = partition_spec(".".join(map(str, path)), value.shape, mesh, rules, min_fsdp_size)
            variable = variable.replace(NamedSharding(mesh, spec))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(mesh: Mesh) -> tuple[int, int]:
    """``(index, count)``: this process feeds row block ``index`` of ``count`` equal blocks of a batch.

    A batch is split over the ``BATCH_AXES`` of the mesh; the devices of a process must hold
    one contiguous run of those shards (as ``jax.make_mesh`` lays processes out). Processes
    whose devices differ only along other axes feed the same block.
    """
    batch_dims = [mesh.axis_names.index(a) for a in BATCH_AXES]
    sizes = [mesh.devices.shape[d] for d in batch_dims]
    mine = sorted({int(np.ravel_multi_index([pos[d] for d in batch_dims], sizes))
                   for pos, device in np.ndenumerate(mesh.devices) if device.process_index == jax.process_index()})
    held, shards = len(mine), math.prod(sizes)
    if mine != list(range(mine[0], mine[0] + held)) or mine[0] % held:
        raise ValueError(f"process {jax.process_index()} holds batch shards {mine} of {shards}, not one aligned "
                         "block; build the mesh with jax.make_mesh or order its devices by process")
    return mine[0] // held, shards // held


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *, split_frames: bool = False) -> dict[str, jax.Array]:
    """This process's clips ``[b, T, ...]`` of a batch -> global arrays split over ``BATCH_AXES``.

    Every process passes the row block ``process_rows(mesh)`` names; together they form the batch.
    By default the clips are split (``B`` must divide over the devices); with ``split_frames``
    the arrays become frames ``[B*T, ...]`` split by frame (``B*T`` must divide), for more
    devices than clips (steps with ``StepOptions.frames_per_clip = T``).
    """
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if split_frames:
        local = {k: np.reshape(v, (-1, *np.shape(v)[2:])) for k, v in local.items()}
    sizes = {len(v) for v in local.values()}
    rows = sizes.pop()
    if sizes:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted({rows, *sizes})}")
    total = rows * process_rows(mesh)[1]
    if total % shards:
        what, fix = ("frames", "batch size x frames per clip") if split_frames else ("clips", "batch size")
        raise ValueError(f"a global batch of {total} {what} does not split over {' x '.join(BATCH_AXES)} = "
                         f"{shards} devices; make the {fix} a multiple of {shards}"
                         + ("" if split_frames else ", or split frames over the devices (sharding.split_frames)"))
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (total, *np.shape(v)[1:]))
            for k, v in local.items()}


def place(tree: nnx.State, shardings: nnx.State) -> nnx.State:
    """Host (or single-device) arrays -> global arrays with ``shardings`` (same tree).

    Every process must hold the same values (e.g. weights read from one file).
    """
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)
