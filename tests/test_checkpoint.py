"""Model directories: version-1 directories (fused projections stored merged) still load."""

import json
import re

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from vda_jax.convert.readers import read_checkpoint

from vda_jax.checkpoint import load_checkpoint

# Official key -> our path of the fused projections; version 1 stored them as plain
# Linear kernels (the official weight transposed) and biases.
_FUSED = [(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.blocks.\1.attn.qkv.\2"),
          (r"head\.motion_modules\.(\d)\.temporal_transformer\.transformer_blocks\.0\.ff\.net\.0\.proj\.(weight|bias)",
           r"head.temporal.\1.ff.proj.\2")]


def test_version_1_directory_loads_like_a_fresh_conversion(fixtures, tiny_model_dir, tiny_model, tmp_path):
    official = read_checkpoint(str(fixtures / "tiny.pth"))
    params = nnx.to_pure_dict(nnx.state(tiny_model))
    replaced = 0
    for key, value in official.items():
        for pattern, target in _FUSED:
            if re.fullmatch(pattern, key):
                *path, leaf = re.sub(pattern, target, key).split(".")
                node = params
                for part in path:
                    node = node[int(part) if part.isdigit() else part]
                node["kernel" if leaf == "weight" else "bias"] = np.asarray(value.T if leaf == "weight" else value)
                replaced += 1
    assert replaced == 2 * (12 + 4)  # qkv of 12 blocks, ff.proj of 4 temporal layers
    old = tmp_path / "v1"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(old / "params", params)
        checkpointer.wait_until_finished()
    info = json.loads((tiny_model_dir / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**info, "version": 1}))

    loaded = nnx.to_flat_state(nnx.state(load_checkpoint(str(old))))
    expected = dict(nnx.to_flat_state(nnx.state(tiny_model)))
    assert len(loaded) == len(expected)
    for path, variable in loaded:
        np.testing.assert_array_equal(variable.get_value(), expected[path].get_value(), err_msg=str(path))
    assert expected[("encoder", "blocks", 0, "attn", "qkv", "kernel")].get_value().shape == (64, 3, 64)
