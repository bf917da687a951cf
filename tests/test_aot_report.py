"""Reading compiled programs (``vda_jax.aot``) on closed-form cases: FLOP counts, HLO collectives, targets."""

import jax
import jax.numpy as jnp
import pytest

from vda_jax.aot import flops, report
from vda_jax.aot.targets import TargetError, get_target


def _flops(fn, *shapes):
    return flops.traced_flops(jax.jit(fn).trace(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)))


def test_flops_count_loops_branches_and_gradients():
    def frames(x, w):  # a loop over 10 frames, as map_frames runs chunks
        return jax.lax.map(lambda a: jnp.tanh(a @ w), x)

    matmul = 2 * 256 * 512 * 512
    assert _flops(frames, (10, 256, 512), (512, 512)) == 10 * matmul
    # The gradient for w: the forward matmul and one more per frame (d/dw); none for x.
    assert _flops(jax.grad(lambda x, w: frames(x, w).sum(), argnums=1), (10, 256, 512), (512, 512)) == 20 * matmul
    # A conditional counts its costlier branch.
    assert _flops(lambda x, w: jax.lax.cond(x[0, 0] > 0, lambda: x @ w, lambda: x), (4, 4), (4, 4)) == 2 * 4 * 4 * 4
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert _flops(conv, (2, 16, 16, 8), (3, 3, 8, 4)) == 2 * (2 * 16 * 16 * 4) * (3 * 3 * 8)
    assert _flops(lambda x, w: jnp.einsum("bij,bjk->bik", x, w), (3, 5, 7), (3, 7, 2)) == 2 * 3 * 5 * 7 * 2


def test_collectives_and_array_bytes_from_hlo():
    hlo = """
  %all-reduce-start = (f32[1024]{0}, bf16[8,4]{1,0}) all-reduce-start(%a, %b), replica_groups={}
  %all-reduce-done = (f32[1024]{0}, bf16[8,4]{1,0}) all-reduce-done(%all-reduce-start)
  %ag = bf16[16,128]{1,0} all-gather(%p), dimensions={0}
  ROOT %a2a = (s32[4]{0}, pred[16]{0}) all-to-all(%x, %y), dimensions={0}
  %not = f32[2]{0} add(%u, %v)
"""
    assert report.collectives(hlo) == {"all-reduce": {"count": 1, "bytes": 4096 + 64},
                                       "all-gather": {"count": 1, "bytes": 4096},
                                       "all-to-all": {"count": 1, "bytes": 16 + 16}}
    assert report.array_bytes("(f32[2,3]{1,0}, bf16[4], f8e4m3fn[8], s32[])") == 24 + 8 + 8 + 4


def test_cpu_target_and_bad_names():
    target = get_target("cpu:2")
    assert len(target.devices) == 2 and target.hosts == 1 and target.accelerator is None
    assert report.usable_memory(target) is None
    for name, message in [("h100", "needs a size"), ("h100:0", "positive integer"), ("h100:12", "multiple of 8"),
                          ("v100:1", "unknown target 'v100:1'"), ("cpu:64", "jax_num_cpu_devices', 64")]:
        with pytest.raises(TargetError, match=message):
            get_target(name)
