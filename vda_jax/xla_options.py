"""XLA compiler options of the programs vda-jax builds: inference, streaming, pseudo-labels, training.

XLA:CPU's experimental YNNPACK fusions (on by default in jaxlib 0.10) make the vits
window step about 17% slower on an x86 CPU (540x960 frames at input 140: 120-128 ->
101-107 ms per new frame on 2 cores; the tiny demo model's training step 12%) and its
compile longer, so vda-jax compiles these programs without them: XLA then runs the same
dots and convolutions through its other CPU kernels (outputs within the parity tests'
tolerance either way). Options of the CPU compiler (``xla_cpu_*``) are ignored by the
GPU and TPU compilers.

``VDA_JAX_YNN_FUSIONS=on`` keeps XLA's default; it is read when a program is built.
"""

from __future__ import annotations

import os

YNN_ENV = "VDA_JAX_YNN_FUSIONS"


def compiler_options() -> dict[str, str]:
    """The ``compiler_options`` of ``jax.jit`` for vda-jax's programs."""
    setting = os.environ.get(YNN_ENV, "off").strip().lower()
    if setting not in ("on", "off"):
        raise ValueError(f"{YNN_ENV} must be 'on' or 'off', got {os.environ[YNN_ENV]!r}")
    return {} if setting == "on" else {"xla_cpu_experimental_ynn_fusion_type": ""}
