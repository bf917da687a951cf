"""Compile targets: the devices of accelerators this machine does not have, for ahead-of-time compiles.

A target names a set of devices:

  cpu:N                N simulated host devices (``jax_num_cpu_devices`` >= N)
  h100:N, h200:N,      N NVIDIA GPUs, 8 per host (N <= 8, or a multiple of 8)
  a100-80g:N, a100-40g:N
  tpu-<gen>:<topology> a TPU slice libtpu knows, e.g. tpu-v5e:2x2, tpu-v5p:2x2x2, tpu-v6e:2x2

GPU and TPU targets are compile-only devices (``jax.experimental.topologies``): a program
lowered with shardings over a mesh of them is compiled by the accelerator's own compiler
(XLA:GPU with cuDNN and ptxas from ``jax-cuda13-plugin``, XLA:TPU from ``libtpu``; both come
with ``pip install -e ".[aot]"``) and never runs. No GPU or TPU backend is initialised, so
this works on a CPU-only host; run such processes with ``jax_platforms=cpu``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import os
import re

import jax

from vda_jax.devices import ACCELERATORS, Accelerator, Platform

GPUS_PER_HOST = 8
GPU_KINDS = ("h100", "h200", "a100-80g", "a100-40g")
EXAMPLES = ("cpu:8", "h100:8", "h100:64", "a100-40g:8", "tpu-v5e:2x2", "tpu-v5p:4x4x4", "tpu-v6e:2x2")


@dataclasses.dataclass(frozen=True)
class Target:
    """A named set of devices to compile for.

    name: as given, e.g. "h100:8".
    devices: the devices, in the order a mesh over them takes (host-major).
    accelerator: the published figures of one device (``vda_jax.devices.ACCELERATORS``); None for CPU.
    """

    name: str
    devices: tuple[jax.Device, ...]
    accelerator: Accelerator | None

    @property
    def platform(self) -> Platform:
        return Platform.of(self.devices)

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


class TargetError(ValueError):
    """A target that cannot be built here, with what to do about it."""


def get_target(name: str) -> Target:
    """The devices of target ``name`` (see the module docstring); one line saying what is wrong otherwise."""
    kind, _, size = name.partition(":")
    if not size:
        raise TargetError(f"target {name!r} needs a size after ':', e.g. {', '.join(EXAMPLES)}")
    if kind == "cpu":
        return Target(name, _cpu_devices(_count(name, size)), None)
    if kind in GPU_KINDS:
        return Target(name, _gpu_devices(kind, _count(name, size)), ACCELERATORS[kind])
    if kind.startswith("tpu-") and kind in ACCELERATORS:
        return Target(name, _tpu_devices(kind.removeprefix("tpu-"), size), ACCELERATORS[kind])
    known = ["cpu", *GPU_KINDS, *(k for k in ACCELERATORS if k.startswith("tpu-"))]
    raise TargetError(f"unknown target {name!r}: the kinds are {', '.join(known)} (e.g. {', '.join(EXAMPLES)})")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _count(name: str, size: str) -> int:
    if not size.isdigit() or int(size) < 1:
        raise TargetError(f"target {name!r}: the device count must be a positive integer")
    return int(size)


def _cpu_devices(count: int) -> tuple[jax.Device, ...]:
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise TargetError(f"cpu:{count} needs {count} CPU devices but this process has {len(devices)}: "
                          f"jax.config.update('jax_num_cpu_devices', {count}) before JAX starts")
    return tuple(devices[:count])


def gpu_target_config(kind: str) -> str:
    """XLA's GPU target description of ``kind`` (text ``GpuTargetConfigProto``), with the installed cuDNN's version."""
    text = importlib.resources.files("vda_jax.aot").joinpath("gpu_targets", f"{kind}.txtpb").read_text()
    from jax._src.lib import cuda_versions  # None without jax-cuda13-plugin

    if cuda_versions is not None:
        version = cuda_versions.cudnn_get_version()  # e.g. 92801 for 9.28.1
        major, minor, patch = version // 10000, version // 100 % 100, version % 100
        text = re.sub(r"dnn_version_info \{[^}]*\}",
                      f"dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}", text)
    return text


@functools.cache
def _gpu_devices(kind: str, count: int) -> tuple[jax.Device, ...]:
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
        raise TargetError(f"{kind}:{count}: more than {GPUS_PER_HOST} GPUs come in whole hosts of "
                          f"{GPUS_PER_HOST}; use a multiple of {GPUS_PER_HOST}")
    if not installed("jax_plugins.xla_cuda13"):
        raise TargetError(f"GPU targets need JAX's CUDA compiler: pip install -e \".[aot]\" "
                          f"(jax-cuda13-plugin[with-cuda]=={jax.__version__})")
    from jax.experimental import topologies

    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    topology = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(kind),
                                            topology=f"1x{hosts}x{per_host}")
    return tuple(topology.devices)


@functools.cache
def _tpu_devices(generation: str, topology: str) -> tuple[jax.Device, ...]:
    if not installed("libtpu"):
        raise TargetError(f"TPU targets need libtpu: pip install -e \".[aot]\" (jax[tpu]=={jax.__version__})")
    # Without these libtpu looks for a TPU VM's metadata server and prints warnings, and holds a
    # lock file that keeps a second process from loading it; a compile-only topology touches no TPU.
    for variable, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", f"{generation}-8"),
                            ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(variable, value)
    from jax.experimental import topologies

    try:
        return tuple(topologies.get_topology_desc(topology_name=f"{generation}:{topology}", platform="tpu").devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise TargetError(f"tpu-{generation}:{topology}: libtpu does not know this slice "
                          f"({str(e).splitlines()[0]})") from e
