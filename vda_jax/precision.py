"""The project's one precision vocabulary: "fp32", "tf32" and "bf16".

Used by the CLI (``--precision``), the inference and evaluation APIs and the training
config (``precision``). Parameters always stay float32; a precision sets the compute
dtype of the activations and the precision of float32 matmuls and convolutions:

  fp32: float32 activations, matmuls and convolutions at full float32 precision
        (``HIGHEST``) on every backend (GPUs would otherwise use TF32, TPUs one bf16 pass).
  tf32: float32 activations, matmuls and convolutions in TensorFloat-32 on GPUs
        (``jax.default_matmul_precision("tensorfloat32")``; three bf16 passes on TPUs).
  bf16: bfloat16 activations (the last output convolutions stay float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vda_jax.devices import Platform

PRECISIONS = ("fp32", "tf32", "bf16")
_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16"}
# jax.default_matmul_precision names; bf16 inputs need none.
_MATMUL = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": None}


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {list(PRECISIONS)}")
    return name


def compute_dtype(name: str) -> Any:
    """The activations' dtype at precision ``name`` (``jnp.float32`` or ``jnp.bfloat16``)."""
    import jax.numpy as jnp  # here, so the CLI can read the vocabulary without importing JAX

    return getattr(jnp, _DTYPES[check_precision(name)])


def matmul_precision(name: str) -> str | None:
    """The ``jax.default_matmul_precision`` float32 matmuls run at (None: leave the default)."""
    return _MATMUL[check_precision(name)]


def default_precision(platform: Platform) -> str:
    """The precision for a program's devices (``Platform.of``): fp32 on CPU, bf16 on accelerators."""
    return "fp32" if platform.kind == "cpu" else "bf16"
