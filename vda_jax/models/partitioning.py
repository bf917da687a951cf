"""Logical axis names -> mesh axes, applied where arrays are used (MaxText style).

Layers name the axes of the parameters and activations they use ("heads", "mlp", "frames",
"space", ...). A jitted step that runs on a mesh sets the table from names to mesh axes for
its trace (``axis_rules``); ``constrain`` then lays an activation out as its names say, every
unnamed or unmapped axis replicated, and ``gather`` does so for a parameter at its use: it
is gathered there from its FSDP shards (the transpose reduce-scatters its gradient), so XLA
never has to guess a layout. Outside ``axis_rules`` both are no-ops: single-device code runs
as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax.nnx.nn import dtypes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Logical name -> mesh axis, tuple of mesh axes, or None (replicated).
Rules = Mapping[str, str | tuple[str, ...] | None]
Names = Sequence[str | None]

_context: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within the block, ``constrain`` lays arrays out on ``mesh`` by ``rules``."""
    _context.append((mesh, rules))
    try:
        yield
    finally:
        _context.pop()


def _size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _spec(names: Names, shape: tuple[int, ...], even: bool) -> tuple[Mesh, P]:
    mesh, rules = _context[-1]
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for an array of shape {shape}")
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = None if name is None else rules.get(name)
        spec.append(None if axes is None or (even and dim % _size(mesh, axes)) else axes)
    return mesh, P(*spec)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Activation ``x`` laid out as its axes' ``names`` map under ``axis_rules`` (no-op outside).

    A mapped axis need not divide its dimension (XLA pads the last shard).
    """
    if not _context:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(*_spec(names, x.shape, even=False)))


def gather(x: jax.Array, names: Names) -> jax.Array:
    """Parameter ``x`` at its use: on the mesh axes its ``names`` map to only (no-op outside ``axis_rules``).

    As the placement rules of the parameters do, a mesh axis that does not divide its
    dimension is dropped; every other axis (``fsdp``) is gathered.
    """
    if not _context:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(*_spec(names, x.shape, even=True)))


@dataclasses.dataclass(frozen=True)
class GatherAtUse:
    """A Flax ``promote_dtype`` that first ``gather``s the kernel and bias by their axis names.

    Given to ``nnx.Linear`` / ``nnx.Conv`` (their hook on the parameters at use), so the
    kernel and bias reach the matmul gathered from their FSDP shards, split only on the
    axes the rules name (e.g. "heads" on ``tensor``).
    """

    kernel: tuple[str | None, ...]
    bias: tuple[str | None, ...] = (None,)

    def __call__(self, args, /, *, dtype=None, inexact=True):
        inputs, kernel, bias = args
        kernel = gather(kernel, self.kernel)
        bias = None if bias is None else gather(bias, self.bias)
        return dtypes.promote_dtype((inputs, kernel, bias), dtype=dtype, inexact=inexact)
