"""The Flax model against the official PyTorch forward passes, and its parts against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from vda_jax.convert.convert import convert_state_dict
from vda_jax.convert.readers import read_checkpoint

from vda_jax.config import config_from_json
from vda_jax.models.temporal import Ring, TemporalAttention, TemporalModule, sinusoidal_table


def _run(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def test_forward_matches_official(tiny_model, fixtures):
    ref = np.load(fixtures / "tiny_forward.npz")
    x = jnp.asarray(ref["x"]).transpose(0, 1, 3, 4, 2)  # NCHW -> NHWC, 98x126 = 7x9 patches
    depth = _run(tiny_model, x)
    assert depth.shape == ref["depth"].shape
    assert np.abs(depth - ref["depth"]).max() <= 1e-5 * np.abs(ref["depth"]).max()


def test_head_skips_inactive_frames_only_in_its_per_frame_end(tiny_model, fixtures):
    ref = np.load(fixtures / "tiny_forward.npz")
    x = jnp.asarray(ref["x"]).transpose(0, 1, 3, 4, 2)
    b, t = x.shape[:2]
    active = np.arange(b * t) % t < 2  # per clip: the first two frames
    graphdef, state = nnx.split(tiny_model)

    def depth(state, x):
        model = nnx.merge(graphdef, state)
        features = model.encode(x.reshape(b * t, *x.shape[2:]))
        return model.decode(features, t, x.shape[2:4], frames_per_chunk=1, active=jnp.asarray(active))[0]

    out = np.asarray(jax.jit(depth)(state, x)).reshape(b * t, *x.shape[2:4])
    expected = ref["depth"].reshape(out.shape)
    # The temporal layers saw every frame: the active ones are the official's.
    assert np.abs(out[active] - expected[active]).max() <= 1e-5 * np.abs(expected).max()
    assert not np.any(out[~active])


def test_image_checkpoint_gives_the_image_model_per_frame(fixtures):
    """A Depth Anything V2 checkpoint -> identity temporal layers -> the image model's depths."""
    config = config_from_json(str(fixtures / "tiny_architecture.json"))
    model = convert_state_dict(read_checkpoint(fixtures / "tiny_dav2.pth"), config)
    ref = np.load(fixtures / "tiny_dav2_forward.npz")
    x = jnp.asarray(ref["x"]).transpose(0, 2, 3, 1)[None]  # four images as one clip
    depth = _run(model, x)[0]
    assert np.abs(depth - ref["depth"]).max() <= 1e-5 * np.abs(ref["depth"]).max()
    for module in model.head.temporal:
        assert not np.any(module.proj_out.kernel[...]) and not np.any(module.proj_out.bias[...])


def test_clips_in_a_batch_are_independent_and_image_mode_works(tiny_model, fixtures):
    x = jnp.asarray(np.load(fixtures / "tiny_forward.npz")["x"]).transpose(0, 1, 3, 4, 2)
    both = _run(tiny_model, jnp.concatenate([x[:, :3], x[:, 3:]]))
    np.testing.assert_allclose(both[0], _run(tiny_model, x[:, :3])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], _run(tiny_model, x[:, 3:])[0], rtol=1e-5, atol=1e-5)
    single = _run(tiny_model, x[:, :1])
    assert single.shape == (1, 1, 98, 126) and np.all(np.isfinite(single))


def test_bfloat16_compute_stays_close(tiny_model_dir, tiny_model, fixtures):
    from vda_jax.checkpoint import load_checkpoint

    x = jnp.asarray(np.load(fixtures / "tiny_forward.npz")["x"]).transpose(0, 1, 3, 4, 2)
    ref = _run(tiny_model, x)
    low = _run(load_checkpoint(str(tiny_model_dir), dtype=jnp.bfloat16), x)
    assert low.dtype == np.float32
    assert np.abs(low - ref).mean() <= 0.03 * np.abs(ref).mean()


def test_rejects_bad_shapes(tiny_model):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_model(jnp.zeros((1, 2, 30, 28, 3)))
    with pytest.raises(ValueError, match="1 <= T <= 32"):
        tiny_model(jnp.zeros((1, 33, 28, 28, 3)))


def test_sinusoidal_table_closed_form():
    table = sinusoidal_table(5, 6)
    pos = 3  # channel pair (4, 5) has frequency 10000 ** (-4 / 6)
    freq = 10000.0 ** (-4 / 6)
    np.testing.assert_allclose(table[pos, 4], np.sin(pos * freq), rtol=1e-6)
    np.testing.assert_allclose(table[pos, 5], np.cos(pos * freq), rtol=1e-6)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)


@pytest.mark.parametrize("pe", ["ape", "rope"])
def test_temporal_attention_with_cache_equals_the_last_row(pe):
    """Querying one new frame against the cached keys and values of past frames = the last frame of full attention."""
    attention = TemporalAttention(16, heads=4, max_frames=8, pe=pe, rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 16))  # [B, T, S, D]
    full, _ = attention(x)
    first, cached = attention(x[:, :-1], cached=())  # a stream's first frames: keys and values for the cache
    slots = np.array([3, 0, 5, 1])  # where the 4 past frames sit in a ring of 6; the new one goes to slot 2
    ring = tuple(jnp.zeros((2, 6, 3, 16)).at[:, slots].set(c) for c in cached)
    last, updated = attention(x[:, -1:], cached=Ring(ring, jnp.int32(2), jnp.asarray([*slots, 2])))
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(attention(x[:, :-1])[0]))
    _, new = attention(x[:, -1:], cached=())  # the new frame's keys and values, alone
    for before, after, frame in zip(ring, updated, new):
        np.testing.assert_array_equal(np.asarray(after[:, 2]), np.asarray(frame[:, 0]))
        np.testing.assert_array_equal(np.asarray(np.delete(after, 2, axis=1)), np.asarray(np.delete(before, 2, axis=1)))
    with pytest.raises(TypeError, match="Ring"):
        attention(x[:, -1:], cached=cached)


def test_temporal_attention_of_a_clip_projects_nothing_for_a_cache():
    """A clip (no cache) returns no keys and values, and computes none: q, k, v, out and the two attention
    products are the only matmuls (the cache's projections of the unencoded inputs were dead code)."""
    attention = TemporalAttention(16, heads=4, max_frames=8, pe="ape", rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 16))
    assert attention(x)[1] == ()
    graphdef, state = nnx.split(attention)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, x)
    assert str(jaxpr).count("dot_general") == 6


def test_temporal_module_is_per_position_and_starts_as_identity():
    module = TemporalModule(32, heads=8, max_frames=8, pe="ape", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 5, 32))
    y, cache = module(x, ())
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # zero-initialised proj_out
    assert [c.shape for c in cache] == [(2, 4, 15, 32)] * 4  # keys and values of 2 attention sub-blocks
    assert module(x)[1] == ()  # a clip: none
    module.proj_out.kernel[...] = jax.random.normal(jax.random.key(2), module.proj_out.kernel.shape)
    y, _ = module(x)
    # Attention runs along time only: permuting spatial positions permutes the output.
    perm = jax.random.permutation(jax.random.key(3), 15)
    flat = lambda a: a.reshape(2, 4, 15, 32)  # noqa: E731
    y_perm, _ = module(flat(x)[:, :, perm].reshape(x.shape))
    np.testing.assert_allclose(np.asarray(flat(y_perm)), np.asarray(flat(y)[:, :, perm]), rtol=1e-5, atol=1e-5)
