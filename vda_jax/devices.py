"""The devices a program is compiled for: their platform, memory and published peak rates.

Options whose best value depends on the hardware (precision, attention implementation, the
per-frame chunk budget) default to what ``Platform.of(devices)`` says of the devices the
program is compiled for, real or compile-only (``vda_jax.aot.targets``), never to the
process's default backend: a program compiled on a CPU host for an H100 target gets the
H100's choices, and a real H100 the same ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax

MIB = 2**20
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One accelerator model's published figures, per device (one GPU, one TPU chip).

    device_kind: as JAX names it (``jax.Device.device_kind``).
    platform: "cuda" or "tpu".
    memory_bytes: high-bandwidth memory.
    bf16_flops: dense bfloat16 matrix peak, FLOP/s.
    memory_bandwidth: bytes/s.
    source: where the figures are published.
    """

    device_kind: str
    platform: str
    memory_bytes: int
    bf16_flops: float
    memory_bandwidth: float
    source: str


# Vendors' figures; "80GB" HBM is 80 GiB of stacks (5 x 16 GiB), the TPUs' "GiB" as Google states it.
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 80GB HBM3", "cuda", 80 * GIB, 989.4e12, 3.35e12,
                        "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (dense BF16: half the "
                        "1,979 TFLOPS quoted with sparsity)"),
    "h200": Accelerator("NVIDIA H200", "cuda", 143771 * 2**20, 989.4e12, 4.8e12,
                        "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (141 GB at 4.8 TB/s; the "
                        "memory as nvidia-smi reports it)"),
    "a100-80g": Accelerator("NVIDIA A100-SXM4-80GB", "cuda", 80 * GIB, 312e12, 2.039e12,
                            "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column"),
    "a100-40g": Accelerator("NVIDIA A100-SXM4-40GB", "cuda", 40 * GIB, 312e12, 1.555e12,
                            "NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM column"),
    "tpu-v4": Accelerator("TPU v4", "tpu", 32 * GIB, 275e12, 1.2e12, "Google Cloud TPU v4 documentation"),
    "tpu-v5e": Accelerator("TPU v5 lite", "tpu", 16 * GIB, 197e12, 8.1e11, "Google Cloud TPU v5e documentation"),
    "tpu-v5p": Accelerator("TPU v5", "tpu", 95 * GIB, 459e12, 2.765e12, "Google Cloud TPU v5p documentation"),
    "tpu-v6e": Accelerator("TPU v6 lite", "tpu", 32 * GIB, 918e12, 1.64e12, "Google Cloud TPU v6e documentation"),
}

# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_GPU_MEMORY_FRACTION = 0.75


def accelerator(device_kind: str) -> Accelerator | None:
    """The published figures of a device kind, or None for a kind the table does not know."""
    return next((a for a in ACCELERATORS.values() if a.device_kind == device_kind), None)


def gpu_memory_fraction() -> float:
    """The share of each GPU's memory JAX may allocate: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or JAX's default."""
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEMORY_FRACTION))


@dataclasses.dataclass(frozen=True)
class Platform:
    """What a program's devices imply for its options.

    kind: "cpu", "cuda", "rocm", "tpu" (or another PJRT platform's name).
    memory_bytes: one device's memory, None on CPU (host memory, no budget).
    """

    kind: str
    memory_bytes: int | None = None

    @classmethod
    def of(cls, devices: Sequence[jax.Device] | None = None) -> Platform:
        """The platform of ``devices`` (default: ``jax.devices()``), which must all be of one kind."""
        devices = list(jax.devices() if devices is None else devices)
        kinds = {(d.platform, d.device_kind) for d in devices}
        if len(kinds) != 1:
            raise ValueError(f"a program's devices must be of one kind, got {sorted(kinds)}")
        device = devices[0]
        if device.platform == "cpu":
            return cls("cpu")
        known = accelerator(device.device_kind)
        if device.platform == "gpu":
            kind = "cuda" if device.device_kind.startswith("NVIDIA") else "rocm"
        else:
            kind = device.platform
        memory = known.memory_bytes if known else _reported_memory(device)
        return cls(kind, memory)


def _reported_memory(device: jax.Device) -> int | None:
    """The memory a real device reports (compile-only devices of unknown kinds report none)."""
    try:
        stats = device.memory_stats() or {}
    except jax.errors.JaxRuntimeError:  # a compile-only device
        return None
    return stats.get("bytes_limit")
