"""The inference programs' XLA options: YNNPACK fusions off by default, XLA's default on request."""

import numpy as np
import pytest

from vda_jax.inference import stream, video
from vda_jax.inference.preprocess import network_size
from vda_jax.xla_options import YNN_ENV, compiler_options

CASE = "n20_72x96_s70"


@pytest.fixture
def fresh_programs():
    """Programs built under the test's setting, not taken from an earlier test's cache."""
    video._compiled.cache_clear()
    stream._compiled.cache_clear()
    yield
    video._compiled.cache_clear()
    stream._compiled.cache_clear()


@pytest.mark.parametrize("setting", ["off", "on"])
def test_each_setting_reaches_xla_and_matches_the_official_pipelines(
        setting, tiny_model, fixtures, monkeypatch, fresh_programs):
    monkeypatch.setenv(YNN_ENV, setting)
    ref = np.load(fixtures / "tiny_video.npz")
    frames, input_size = ref[f"{CASE}_frames"], int(ref[f"{CASE}_input_size"])
    depth = video.infer_video_depth(tiny_model, frames, input_size=input_size)
    expected = ref[f"{CASE}_depth"]
    assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()
    recorded = np.load(fixtures / "tiny_stream.npz")
    streamed = np.stack(list(stream.stream_depth(tiny_model, recorded["frames"][:3],
                                                 input_size=int(recorded["input_size"]), precision="fp32")))
    assert np.abs(streamed - recorded["depth"][:3]).max() <= 1e-4 * np.abs(recorded["depth"][:3]).max()

    runner = video.WindowRunner(tiny_model, frames.shape[1:3], network_size(frames.shape[1:3], input_size), slots=1)
    # XLA's default fuses the encoder's matmuls into YNNPACK calls; the default here has none.
    assert ("ynn_fusion" in runner.programs.encode.as_text()) == (setting == "on")


def test_off_is_the_default(monkeypatch):
    monkeypatch.delenv(YNN_ENV, raising=False)
    assert compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(YNN_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{YNN_ENV} must be 'on' or 'off', got 'maybe'"):
        compiler_options()
