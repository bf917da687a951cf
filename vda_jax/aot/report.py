"""What a compiled program asks of its devices: memory, fused attention, collectives, FLOPs, a roofline.

Everything is read from the compiler's own output (``memory_analysis()``, the optimised HLO
text, ``cost_analysis()``), per device: an SPMD program is one partition's program.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax

from vda_jax.aot.flops import traced_flops
from vda_jax.aot.targets import Target
from vda_jax.devices import gpu_memory_fraction

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# An HLO instruction: "%name = <result shape> <opcode>(" ; async pairs count once, at "-done"
# (whose result is the collective's output; a "-start" also holds its operands).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z-]+)\(", re.MULTILINE)
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
# cuDNN's fused attention (forward and backward) and TPU kernels of fused attention.
_FUSED_ATTENTION = re.compile(r'custom_call_target="(__cudnn\$fmha[^"]*|tpu_custom_call)"')


@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """Per-device figures of one compiled program.

    devices: the devices the program runs on (of the target's); hosts: the target's.
    flops: the matmul, convolution and fused-attention FLOPs of one step (``vda_jax.aot.flops``),
      the program's total over its devices.
    bytes_accessed: as the compiler's cost analysis gives them (XLA:TPU and XLA:CPU; None on
      XLA:GPU); it counts a loop's body once, so it is low for programs that loop over frames.
    roofline_step_seconds: an estimate, the larger of flops / peak bf16 FLOP/s and the bytes
      that must move at least (every argument read and every output written once) / memory
      bandwidth, from the target's published peaks; None on CPU targets.
    """

    target: str
    device_kind: str
    devices: int
    hosts: int
    device_memory_bytes: int | None
    usable_memory_bytes: int | None
    arguments_bytes: int
    outputs_bytes: int
    temporaries_bytes: int
    fused_attention_calls: int
    collectives: dict[str, dict[str, int]]
    flops: float
    bytes_accessed: float | None
    roofline_step_seconds: float | None
    compile_s: float

    @property
    def per_device_bytes(self) -> int:
        return self.arguments_bytes + self.outputs_bytes + self.temporaries_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.usable_memory_bytes is None else self.per_device_bytes <= self.usable_memory_bytes

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "per_device_bytes": self.per_device_bytes, "fits": self.fits}


def usable_memory(target: Target) -> int | None:
    """The bytes a program may use per device: JAX's share of a GPU's memory
    (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default), a TPU's whole HBM; None on CPU."""
    accelerator = target.accelerator
    if accelerator is None:
        return None
    fraction = gpu_memory_fraction() if accelerator.platform == "cuda" else 1.0
    return int(accelerator.memory_bytes * fraction)


def array_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape string, e.g. "(f32[2,3]{1,0}, bf16[4])" -> 32."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count", "bytes"}}`` of the collectives in optimised HLO text (output bytes per device)."""
    found: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for shape, opcode in _INSTRUCTION.findall(hlo_text):
        kind = opcode.removesuffix("-done")
        if kind in COLLECTIVES and not opcode.endswith("-start"):
            found[kind]["count"] += 1
            found[kind]["bytes"] += array_bytes(shape)
    return dict(found)


def fused_attention_calls(hlo_text: str) -> int:
    return len(_FUSED_ATTENTION.findall(hlo_text))


def program_devices(compiled: jax.stages.Compiled) -> int:
    """The devices a compiled program runs on."""
    return max(len(s.device_set) for s in jax.tree.leaves(compiled.input_shardings))


def analyse(traced: jax.stages.Traced, compiled: jax.stages.Compiled, target: Target,
            compile_s: float) -> CompiledReport:
    """The report of ``compiled``, compiled from ``traced`` for ``target``."""
    stats = compiled.memory_analysis()
    text = compiled.as_text()
    devices = program_devices(compiled)
    flops = traced_flops(traced) / devices
    # Donated arguments alias outputs: their bytes count once.
    outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    roofline = None
    if target.accelerator is not None:
        roofline = max(flops / target.accelerator.bf16_flops,
                       (stats.argument_size_in_bytes + outputs) / target.accelerator.memory_bandwidth)
    return CompiledReport(
        target=target.name, device_kind=target.devices[0].device_kind, devices=devices, hosts=target.hosts,
        device_memory_bytes=None if target.accelerator is None else target.accelerator.memory_bytes,
        usable_memory_bytes=usable_memory(target), arguments_bytes=stats.argument_size_in_bytes,
        outputs_bytes=outputs, temporaries_bytes=stats.temp_size_in_bytes,
        fused_attention_calls=fused_attention_calls(text), collectives=collectives(text), flops=flops,
        bytes_accessed=(compiled.cost_analysis() or {}).get("bytes accessed"), roofline_step_seconds=roofline,
        compile_s=round(compile_s, 1))
