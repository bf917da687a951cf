"""Streaming inference against the official streaming mode and its cache bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vda_jax.inference import stream
from vda_jax.inference.stream import StreamingDepth, stream_depth


@pytest.fixture(scope="module")
def recorded(fixtures):
    data = np.load(fixtures / "tiny_stream.npz")
    return data["frames"], data["depth"], int(data["input_size"])


def _official_contexts(num_frames: int):
    """Replays the official ``frame_cache_list`` bookkeeping on frame indices: frame k's cached frames."""
    cache = [0] * 32  # the first frame's states, copied 32 times
    for k in range(1, num_frames):
        yield cache[0:2] + cache[-29:]
        cache.append(k)
        if k + 32 > 41 + 1:
            del cache[1]


def test_matches_official_stream(tiny_model, recorded):
    frames, expected, input_size = recorded
    depth = np.stack(list(stream_depth(tiny_model, frames, input_size=input_size, precision="fp32")))
    assert depth.shape == expected.shape and depth.dtype == np.float32
    assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()


def test_ring_serves_the_official_cached_frames():
    """The jitted ring read/write, fed frame indices as states, returns the official frames for 150 steps."""
    read_write = jax.jit(lambda ring, k: (stream.read_context(ring, k),
                                          stream.write_frame(ring, k, (jnp.full((1, 1, 2), k, jnp.int32),))))
    ring = (jnp.zeros((1, stream.RING_SLOTS, 2), jnp.int32),)  # seeded with frame 0
    for k, official in enumerate(_official_contexts(151), start=1):
        (context,), ring = read_write(ring, jnp.int32(k))
        np.testing.assert_array_equal(context[0], np.repeat(np.array(official)[:, None], 2, axis=1), f"frame {k}")


def test_step_compiles_once_and_donates_its_caches(tiny_model, recorded):
    frames, _, input_size = recorded
    frames = np.concatenate([frames, frames[::-1], frames[:20]])  # 100 frames, past the key-frame gap
    streamer = StreamingDepth(tiny_model, input_size, "fp32")
    streamer.step(frames[0])
    for frame in frames[1:]:
        previous = streamer._state
        streamer.step(frame)
        assert all(r.is_deleted() for r in previous.ring)
    start, step = stream._compiled(streamer._graphdef, stream.network_size(streamer.frame_size, input_size))
    assert start._cache_size() == 1 and step._cache_size() == 1


def test_reset_restarts_identically(tiny_model, recorded):
    frames, _, input_size = recorded
    streamer = StreamingDepth(tiny_model, input_size, "fp32")
    first = [streamer.step(f) for f in frames[:4]]
    streamer.reset()
    streamer.step(frames[0, :56, :70])  # another size is fine after a reset
    streamer.reset()
    again = [streamer.step(f) for f in frames[:4]]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_refuses_bad_frames(tiny_model, recorded):
    frames, _, input_size = recorded
    streamer = StreamingDepth(tiny_model, input_size, "fp32")
    streamer.step(frames[0])
    with pytest.raises(ValueError, match=r"frame is 72x90 but the stream started at 72x96.*reset\(\)"):
        streamer.step(frames[1, :, :90])
    with pytest.raises(ValueError, match="uint8 RGB"):
        streamer.step(frames[1].astype(np.float32))
    with pytest.raises(ValueError, match="precision"):
        StreamingDepth(tiny_model, input_size, "fp16")
