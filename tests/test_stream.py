"""Streaming inference against the official streaming mode and its cache bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vda_jax.inference import stream
from vda_jax.inference.stream import StreamingDepth, stream_depth
from vda_jax.models import temporal
from vda_jax.models.temporal import TemporalAttention
from vda_jax.models.vda import compute_model


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
    """The jitted ring write-then-read of each attention, fed frame indices as keys, returns the official
    cached frames and then the new one, for 150 steps."""
    write_read = jax.jit(lambda ring, k: temporal.write_and_read(ring, jnp.full((1, 1, 2), k, jnp.int32),
                                                                 stream.ring_slot(k), stream.read_slots(k)))
    ring = jnp.zeros((1, stream.RING_SLOTS, 2), jnp.int32)  # seeded with frame 0
    for k, official in enumerate(_official_contexts(151), start=1):
        ring, frames = write_read(ring, jnp.int32(k))
        np.testing.assert_array_equal(frames[0], np.repeat(np.array([*official, k])[:, None], 2, axis=1), f"frame {k}")


def test_step_compiles_once_and_donates_its_caches(tiny_model, recorded):
    frames, _, input_size = recorded
    frames = np.concatenate([frames, frames[::-1], frames[:20]])  # 100 frames, past the key-frame gap
    streamer = StreamingDepth(tiny_model, input_size, "fp32")
    streamer.step(frames[0])
    for frame in frames[1:]:
        previous = streamer._state
        streamer.step(frame)
        assert all(r.is_deleted() for r in previous.ring)
    # One program for every frame, the first (which seeds the ring) included.
    assert stream._compiled(streamer._graphdef, stream.network_size(streamer.frame_size, input_size))._cache_size() == 1


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


def _recompute_from_normed_inputs(attend):
    """The formulation before K/V caches, as a ``TemporalAttention.__call__``: a frame's cache entry is its
    normed input (kept in the keys' slot), and every step projects the whole context with its positions
    (the new frames' rows of attention over ``context + new``)."""

    def call(self, x, cached=None):
        if not cached:  # a stream's first frames
            return attend(self, x)[0], (x, x)
        inputs, frames = temporal.write_and_read(cached.arrays[0], x, cached.write, cached.read)
        return attend(self, frames)[0][:, -x.shape[1]:], (inputs, inputs)

    return call


def _jitted_stream(model, frames, input_size):
    """Depth of ``frames`` through a fresh jitted ``stream_step`` (traced now), from zeros of ``state_shapes``."""
    model = compute_model(model, "fp32")
    graphdef, params = nnx.split(model)
    net_size = stream.network_size(frames.shape[1:3], input_size)
    step = jax.jit(lambda p, state, f: stream.stream_step(nnx.merge(graphdef, p), state, f, net_size))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stream.state_shapes(model, net_size))
    depths = []
    for frame in frames:
        state, depth = step(params, state, frame)
        depths.append(depth)
    return np.stack(depths)


def test_key_value_cache_equals_recomputing_from_normed_inputs(tiny_model, recorded, monkeypatch):
    """50 frames, past the 41-frame key gap (RoPE's cache: tests/test_model.py, per attention)."""
    frames, _, input_size = recorded
    frames = np.concatenate([frames, frames[::-1, ::-1]])[:50]
    streamer = StreamingDepth(tiny_model, input_size, "fp32")
    depth = np.stack([streamer.step(frame) for frame in frames])
    monkeypatch.setattr(TemporalAttention, "__call__", _recompute_from_normed_inputs(TemporalAttention.__call__))
    expected = _jitted_stream(tiny_model, frames, input_size)
    assert np.abs(depth - expected).max() <= 1e-5 * np.abs(expected).max()
