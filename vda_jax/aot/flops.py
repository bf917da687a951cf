"""The FLOPs a traced program executes in its matmuls, convolutions and fused attention.

XLA's cost analyses count a loop's body once (``lax.map`` over frame chunks, say), so they
undercount our programs many times over; the jaxpr knows every loop's length. Counted: every
``dot_general`` and ``conv_general_dilated`` (2 FLOPs a multiply-add) and cuDNN's fused
attention (forward 2 matmuls, backward 5 with the recomputed logits), inside scans (times
their length), conditionals (the costlier branch: an upper bound), remat and custom
derivatives; elementwise work is left out (a few percent in these models).
"""

from __future__ import annotations

import math

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def _dot(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2.0 * math.prod(lhs) * math.prod(free)


def _conv(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def _attention(eqn, matmuls: int) -> float:
    q, k = (v.aval.shape for v in eqn.invars[:2])  # [B, T, N, H], [B, S, N, H]
    return 2.0 * matmuls * math.prod(q) * k[1]


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def jaxpr_flops(jaxpr: Jaxpr) -> float:
    """The matmul-class FLOPs of one run of ``jaxpr`` (see the module docstring)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot(eqn)
        elif name == "conv_general_dilated":
            total += _conv(eqn)
        elif name.startswith("dot_product_attention_fwd"):
            total += _attention(eqn, 2)
        elif name.startswith("dot_product_attention_bwd"):
            total += _attention(eqn, 5)
        elif name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def traced_flops(traced: jax.stages.Traced) -> float:
    """The matmul-class FLOPs of a traced (jitted, not yet lowered) program, all devices together."""
    return jaxpr_flops(traced.jaxpr.jaxpr)
