"""The persistent compilation cache is on by default: a second process compiles nothing."""

import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from vda_jax import compilation_cache
from vda_jax.inference import video

CHILD = """
import sys
import jax
import numpy as np

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
from vda_jax import executables
from vda_jax.checkpoint import load_checkpoint
from vda_jax.inference.video import infer_video_depth

frames = np.random.default_rng(int(sys.argv[3])).integers(0, 255, (30, 28, 42, 3), np.uint8)
depth = infer_video_depth(load_checkpoint(sys.argv[1]), frames, input_size=28)
np.save(sys.argv[2], depth)
print(*(events.count(name) for name in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses",
                                         executables.HIT_EVENT, executables.MISS_EVENT)))
"""


def _run(model_dir, home, depth_path, seed: int = 0) -> tuple[int, int, int, int]:
    """(compilation cache hits, misses, stored programs loaded, not found) of a fresh process."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("VDA_JAX_CACHE_DIR", None)
    env["HOME"] = str(home)  # the default directory, under a throwaway home
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(depth_path), str(seed)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(map(int, out.stdout.split()[-4:]))


def test_second_process_traces_and_compiles_nothing(tiny_model_dir, tmp_path):
    # The window step's two programs are compiled and stored whole (JAX's cache is not asked for them).
    assert _run(tiny_model_dir, tmp_path, tmp_path / "cold.npy") == (0, 0, 0, 2)
    stored = tmp_path / ".cache" / "vda-jax" / "xla" / "executables"
    assert len(os.listdir(stored)) == 2
    # A second process loads them: nothing is traced, lowered or compiled.
    assert _run(tiny_model_dir, tmp_path, tmp_path / "warm.npy") == (0, 0, 2, 0)
    np.testing.assert_array_equal(np.load(tmp_path / "warm.npy"), np.load(tmp_path / "cold.npy"))
    # An entry cut short (a crash while another process wrote it) is compiled again and replaced.
    for name in os.listdir(stored):
        (stored / name).write_bytes((stored / name).read_bytes()[:100])
    assert _run(tiny_model_dir, tmp_path, tmp_path / "again.npy") == (0, 0, 0, 2)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "cold.npy"))
    assert _run(tiny_model_dir, tmp_path, tmp_path / "warm.npy") == (0, 0, 2, 0)
    np.testing.assert_array_equal(np.load(tmp_path / "warm.npy"), np.load(tmp_path / "cold.npy"))
    # Other frames of the same shapes: the same programs.
    assert _run(tiny_model_dir, tmp_path, tmp_path / "other.npy", seed=1) == (0, 0, 2, 0)


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
