"""Long-video inference against the official pipeline, batching, feature reuse and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vda_jax.convert.convert import convert_state_dict
from vda_jax.convert.readers import read_checkpoint

from vda_jax import executables
from vda_jax.config import ModelConfig
from vda_jax.inference import video, window
from vda_jax.inference.preprocess import network_size
from vda_jax.models import vda
from vda_jax.models.vit import DinoVisionTransformer

CASES = ["n75_72x96_s70", "n20_72x96_s70", "n54_64x64_s56"]


@pytest.fixture(scope="module")
def tiny_metric_model(tiny_model, fixtures):
    config = ModelConfig.from_dict({**tiny_model.config.to_dict(), "metric": True})
    return convert_state_dict(read_checkpoint(fixtures / "tiny.pth"), config)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["relative", "metric"])
def test_matches_official_pipeline(tiny_model, tiny_metric_model, fixtures, case, kind):
    ref = np.load(fixtures / ("tiny_video.npz" if kind == "relative" else "tiny_metric_video.npz"))
    model = tiny_model if kind == "relative" else tiny_metric_model
    depth = video.infer_video_depth(model, ref[f"{case}_frames"], input_size=int(ref[f"{case}_input_size"]))
    expected = ref[f"{case}_depth"]
    assert depth.shape == expected.shape and depth.dtype == np.float32
    assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()


def test_lazy_frames_and_no_recompile_across_lengths(tiny_model, fixtures):
    frames = np.load(fixtures / "tiny_video.npz")["n75_72x96_s70_frames"]
    whole = video.infer_video_depth(tiny_model, frames, input_size=70)
    before = video._compiled.cache_info()
    lazy = video.infer_video_depth(tiny_model, (f for f in frames[:47]), input_size=70)
    after = video._compiled.cache_info()
    assert after.misses == before.misses  # other lengths and the padded tail reuse the compiled step
    # The first 46 frames see the same windows as in the longer video; frame 46 ends this one.
    np.testing.assert_allclose(lazy[:24], whole[:24], rtol=1e-6, atol=1e-6)
    assert lazy.shape == (47, 72, 96)
    # A sized input is written into one array as windows finish; an iterable is joined at the end.
    np.testing.assert_array_equal(video.infer_video_depth(tiny_model, iter(frames), input_size=70), whole)


@pytest.mark.parametrize("chunk", [1, 2])
def test_every_frame_is_encoded_once(tiny_model, fixtures, monkeypatch, chunk):
    # Chunks of 1 or 2 frames: a chunk runs when one of its frames is new, and 2 divides both the
    # 10 carried inputs and the 32 of a window (larger chunks may also encode carried ones).
    encoder_bytes = vda.frame_bytes(tiny_model.config, (56, 56), jnp.float32).encoder
    monkeypatch.setattr(vda, "default_chunk_bytes", lambda platform: chunk * encoder_bytes)
    encoded = []
    original = DinoVisionTransformer.__call__

    def counting_encoder(self, images, remat=False):
        jax.debug.callback(lambda n: encoded.append(int(n)), images.shape[0])  # runs when the encoder runs
        return original(self, images, remat)

    monkeypatch.setattr(DinoVisionTransformer, "__call__", counting_encoder)
    monkeypatch.setattr(executables, "key", lambda *args: None)  # its keys do not see the patched encoder
    video._compiled.cache_clear()
    frames = np.load(fixtures / "tiny_video.npz")["n54_64x64_s56_frames"]
    video.infer_video_depth(tiny_model, frames, input_size=56)
    jax.effects_barrier()
    video._compiled.cache_clear()
    # 3 windows: 32 frames, 22 new ones, then only padding (copies of frame 53, not encoded again).
    assert sum(encoded) == len(frames) == 54


def test_batched_equals_one_by_one_on_8_devices(tiny_model):
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1, 36, 44, 3), dtype=np.uint8)
    lengths = [5, 23, 40, 12, 30, 8, 1, 26, 45, 17]
    videos = [np.clip(base + rng.integers(-20, 20, (n, 36, 44, 3)), 0, 255).astype(np.uint8) for n in lengths]
    sinks = [video._ListSink() for _ in videos]
    video.infer_videos(tiny_model, [video.VideoJob(v, s, f"v{i}") for i, (v, s) in enumerate(zip(videos, sinks))],
                       input_size=28, batch_size=8)
    for v, sink in zip(videos, sinks):
        batched = np.concatenate(sink.chunks)
        alone = video.infer_video_depth(tiny_model, v, input_size=28)
        assert batched.shape == alone.shape == v.shape[:3]
        np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_bad_input_is_refused(tiny_model):
    with pytest.raises(ValueError, match="no frames"):
        video.infer_video_depth(tiny_model, np.zeros((0, 28, 28, 3), np.uint8), input_size=28)
    with pytest.raises(ValueError, match="uint8 RGB"):
        video.infer_video_depth(tiny_model, np.zeros((3, 28, 28), np.float32), input_size=28)
    frames = [np.zeros((28, 28, 3), np.uint8)] * 12 + [np.zeros((30, 28, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 12 is"):
        video.infer_video_depth(tiny_model, frames, input_size=28)


@pytest.mark.parametrize("frame, size, expected", [
    ((72, 96), 70, (70, 98)), ((64, 64), 56, (56, 56)), ((1080, 1920), 518, (518, 924)),
    ((480, 1280), 518, (350, 938)), ((720, 1280), 280, (280, 504)), ((540, 960), 518, (518, 924)),
    ((100, 333), 518, (280, 938))])  # expected sizes from the official Resize
def test_network_size_follows_the_official_rules(frame, size, expected):
    assert network_size(frame, size) == expected


def test_blend_weights_and_window_counts():
    np.testing.assert_allclose(window.blend_weights(), np.arange(8) / 7, rtol=1e-6)
    assert [window.num_windows(n) for n in (1, 22, 23, 75)] == [1, 1, 2, 4]


@pytest.mark.parametrize("shape", [(2, 32, 9, 13, 3), (1, 3)])
def test_window_buffers_are_read_in_place_by_a_cpu_device(shape):
    """The driver's frame buffers: aligned so a step reads them without copying (they are then
    refilled only after the step that read them is done)."""
    buffer = video.aligned_zeros(shape, np.uint8)
    assert buffer.shape == shape and buffer.dtype == np.uint8 and not buffer.any()
    assert buffer.ctypes.data % 64 == 0 and buffer.flags.c_contiguous
    on_device = jax.device_put(buffer, jax.devices("cpu")[0])
    buffer[(0,) * len(shape)] = 9
    assert np.asarray(on_device)[(0,) * len(shape)] == 9  # the device array is the host buffer
