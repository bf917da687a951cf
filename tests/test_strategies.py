"""Inference strategies: window plans, the official pipeline on one window, and drift on a stub model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vda_jax.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from vda_jax.devices import Platform
from vda_jax.eval import strategies
from vda_jax.inference.video import infer_video_depth
from vda_jax.models.vda import FrameChunks, VideoDepthAnything, default_chunk_bytes

SIZE = 28  # frames of SIZE x SIZE at input_size SIZE: a 2x2 patch grid, no resize
CONTENT = 0.5


class _Encoder(nnx.Module):
    def __init__(self):
        self.dtype = jnp.float32


class ClipStub(nnx.Module):
    """A model whose depth of frame t of a clip is ``(2 + m_0) * (ramp + CONTENT * m_t)``.

    ``m_t`` is the mean normalised input of frame t's first pixel (the tests' frames are uniform
    grey, so it is the frame's mean, without a float32 sum over every pixel: summed one by one, as
    XLA:CPU does unoptimised, that sum alone is off by up to ~n * 2**-24 = 1.4e-4 relative) and
    ``ramp`` a fixed horizontal gradient:
    each frame's depth depends on its own content, times a scale set by the clip's first frame
    (a window-dependent scale, the drift the strategies must handle).
    """

    def __init__(self):
        self.config = ModelConfig(embed_dim=8, num_heads=1)
        self.encoder = _Encoder()
        # VideoDepthAnything's compute options, at their CPU defaults.
        self.matmul_precision, self.attention, self.frame_sharding = "highest", "einsum", None
        self.chunk_bytes = default_chunk_bytes(Platform("cpu"))

    options = VideoDepthAnything.options

    def frames_per_chunk(self, net_size):
        return FrameChunks(1, 1)

    def encode(self, frames, frames_per_chunk=None, remat=False, active=None, prepare=None):
        frames = frames if prepare is None else prepare(frames)
        n, h, w, _ = frames.shape
        mean = frames[:, :1, :1].mean(axis=(1, 2, 3))[:, None, None, None]
        return (jnp.broadcast_to(mean, (n, h // 14, w // 14, self.config.embed_dim)),) * 4

    def decode(self, features, num_frames, image_size, cache=None, frames_per_chunk=None, active=None):
        m = features[0][:, 0, 0, 0].reshape(-1, num_frames, 1, 1)
        ramp = 1.0 + jnp.linspace(0.0, 1.0, image_size[1])
        depth = (2.0 + m[:, :1]) * (ramp + CONTENT * m)
        return jnp.broadcast_to(depth, (*depth.shape[:2], *image_size)), cache


def normalised_mean(grey: np.ndarray) -> np.ndarray:
    """Mean normalised input of uniform grey frames."""
    x = (grey[:, None] / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return x.mean(axis=1)


def stub_depth(grey: np.ndarray, window_of_frame: np.ndarray) -> np.ndarray:
    """The closed form: frame t scaled by the first frame of the window it came from."""
    m = normalised_mean(grey)
    ramp = 1.0 + np.linspace(0.0, 1.0, SIZE)
    depth = (2.0 + m[window_of_frame])[:, None] * (ramp + CONTENT * m[:, None])
    return np.broadcast_to(depth[:, None], (len(grey), SIZE, SIZE))


def grey_video(levels: np.ndarray) -> np.ndarray:
    return np.broadcast_to(levels.astype(np.uint8)[:, None, None, None], (len(levels), SIZE, SIZE, 3)).copy()


@pytest.fixture(scope="module")
def stub():
    return ClipStub()


@pytest.mark.parametrize("overlap", [0, 10])
def test_windows_cover_every_frame_once(overlap):
    for n in range(1, 120):
        plan = strategies.windows(n, overlap)
        covered = np.concatenate([np.arange(w.first, w.stop) for w in plan])
        np.testing.assert_array_equal(covered, np.arange(n))
        assert all(w.start <= w.first < w.stop <= w.start + 32 for w in plan)
        # Each later window starts `overlap` frames before its new ones, inside the previous window.
        assert all(b.first - b.start == overlap and b.start + overlap == a.start + 32 for a, b in zip(plan, plan[1:]))
    assert [w.start for w in strategies.windows(75, 10)] == [0, 22, 44]
    assert [w.start for w in strategies.windows(75, 0)] == [0, 32, 64]


def test_one_window_matches_the_official_pipeline(tiny_model, fixtures):
    # A video shorter than one window is a single padded window for every strategy: the official output.
    ref = np.load(fixtures / "tiny_video.npz")
    frames, expected = ref["n20_72x96_s70_frames"], ref["n20_72x96_s70_depth"]
    for strategy in ("no_overlap", "overlap_alignment"):
        depth = strategies.infer_with_strategy(tiny_model, frames, strategy, input_size=70)
        assert depth.shape == expected.shape and depth.dtype == np.float32
        assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max(), strategy


def test_window_scale_drift(stub):
    # The brightness rises frame by frame, so every window of the stub gets its own scale.
    grey = 40 + 3 * np.arange(60)
    # float32 all through: a few roundings per value and log2(1568) levels of pairwise sums in each
    # fit, two fits deep, ~30 * 2**-24 = 1.8e-6 relative at most; drift would be 0.7.
    rtol = 2e-6
    frames = grey_video(grey)
    first = np.zeros(60, int)
    no_overlap = strategies.infer_with_strategy(stub, frames, "no_overlap", input_size=SIZE)
    np.testing.assert_allclose(no_overlap, stub_depth(grey, first + 32 * (np.arange(60) >= 32)), rtol=rtol)
    # Aligning each window to the previous one on the shared frames carries the first scale through.
    aligned = strategies.infer_with_strategy(stub, frames, "overlap_alignment", input_size=SIZE)
    np.testing.assert_allclose(aligned, stub_depth(grey, first), rtol=rtol)
    # The full method feeds frame 0 to every window as a key frame: no drift either.
    full = strategies.infer_with_strategy(stub, frames, "full", input_size=SIZE)
    np.testing.assert_array_equal(full, infer_video_depth(stub, frames, input_size=SIZE))
    np.testing.assert_allclose(full, stub_depth(grey, first), rtol=rtol)


def test_identical_frames_give_one_depth_for_every_strategy(stub):
    frames = grey_video(np.full(50, 120))
    depths = {s: strategies.infer_with_strategy(stub, iter(frames), s, input_size=SIZE) for s in strategies.STRATEGIES}
    for strategy, depth in depths.items():
        assert depth.shape == (50, SIZE, SIZE), strategy
        np.testing.assert_allclose(depth, depths["full"], rtol=1e-5, err_msg=strategy)
        np.testing.assert_allclose(depth, np.broadcast_to(depth[:1], depth.shape), rtol=1e-6, err_msg=strategy)


def test_bad_input(stub):
    with pytest.raises(ValueError, match=r"unknown strategy 'oi'; choose one of"):
        strategies.infer_with_strategy(stub, grey_video(np.zeros(3)), "oi")
    with pytest.raises(ValueError, match=r"frames must be uint8 RGB \[N, H, W, 3\]"):
        strategies.infer_with_strategy(stub, np.zeros((3, SIZE, SIZE, 3), np.float32), "no_overlap")
