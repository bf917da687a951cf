"""The persistent compilation cache is on by default: a second process compiles nothing."""

import os
import subprocess
import sys

import jax
from flax import nnx

from vda_jax import compilation_cache
from vda_jax.inference import video

CHILD = """
import sys
import jax
import numpy as np

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
from vda_jax.checkpoint import load_checkpoint
from vda_jax.inference.video import infer_video_depth

frames = np.random.default_rng(int(sys.argv[2])).integers(0, 255, (30, 28, 42, 3), np.uint8)
depth = infer_video_depth(load_checkpoint(sys.argv[1]), frames, input_size=28)
assert depth.shape == (30, 28, 42)
print(events.count("/jax/compilation_cache/cache_hits"), events.count("/jax/compilation_cache/cache_misses"))
"""


def _run(model_dir, home, seed: int) -> tuple[int, int]:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("VDA_JAX_CACHE_DIR", None)
    env["HOME"] = str(home)  # the default directory, under a throwaway home
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(seed)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hits, misses = map(int, out.stdout.split()[-2:])
    return hits, misses


def test_second_process_loads_every_program(tiny_model_dir, tmp_path):
    cold = _run(tiny_model_dir, tmp_path, seed=0)
    assert cold[1] > 0 and cold[0] == 0
    assert os.listdir(tmp_path / ".cache" / "vda-jax" / "xla")
    warm = _run(tiny_model_dir, tmp_path, seed=1)  # other frames, same shapes: nothing compiles
    assert warm == (cold[1], 0)


def test_cache_directory_and_opt_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VDA_JAX_CACHE_DIR")
    assert compilation_cache.cache_dir() == str(tmp_path / ".cache" / "vda-jax" / "xla")
    monkeypatch.setenv("VDA_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache.cache_dir() == str(tmp_path / "mine")
    for off in ("off", "OFF", "0", "none", ""):
        monkeypatch.setenv("VDA_JAX_CACHE_DIR", off)
        assert compilation_cache.cache_dir() is None


def test_weights_are_arguments_not_constants(tiny_model):
    """One program (one cache entry) serves every checkpoint of an architecture."""
    graphdef, params = nnx.split(tiny_model)
    other = jax.tree.map(lambda a: a + 1.0, params)
    mesh = video.slot_mesh(1, jax.devices()[:1])
    encode, decode = video.jitted_window_programs(graphdef, (28, 42), (28, 42), mesh)
    shapes = video.window_inputs(graphdef, params, (28, 42), (28, 42), 1)
    for program, inputs in ((encode, (shapes.frames, shapes.first, shapes.real)),
                            (decode, (shapes.state, shapes.encoded, shapes.first, shapes.real))):
        assert program.lower(params, *inputs).as_text() == program.lower(other, *inputs).as_text()
