"""The exact resizes against PyTorch / OpenCV outputs (tests/fixtures/resize_reference.npz) and closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

from vda_jax.models.vit import interpolate_pos_embed
from vda_jax.ops import resize, taps


@pytest.fixture(scope="module")
def ref(fixtures):
    return dict(np.load(fixtures / "resize_reference.npz"))


@pytest.mark.parametrize("size", [(7, 9), (5, 5), (40, 23), (37, 52)])
def test_pos_embed_interpolation_matches_torch_bicubic_by_scale(ref, size):
    grid = ref["grid"]  # [37, 37, 4]
    table = np.concatenate([np.full((1, 4), 7.0, np.float32), grid.reshape(-1, 4)])
    out = np.asarray(interpolate_pos_embed(jnp.asarray(table), *size, offset=0.1))
    np.testing.assert_array_equal(out[0], table[0])  # the cls position is kept
    expected = ref[f"torch_bicubic_{size[0]}x{size[1]}"]
    # Each output is two passes of 4 taps whose |weights| sum to at most 1.25 (a = -0.75), each pass in float32
    # on both sides: at most 2 sides x 2 passes x 4 roundings of 2**-24 relative to 1.25**2 * max|grid|.
    bound = 16 * 2**-24 * 1.25**2 * np.abs(grid).max()
    np.testing.assert_allclose(out[1:].reshape(*size, 4), expected, atol=bound, rtol=0)


def test_pos_embed_at_native_grid_is_unchanged(ref):
    table = jnp.asarray(np.random.default_rng(0).normal(size=(1 + 37 * 37, 4)).astype(np.float32))
    assert interpolate_pos_embed(table, 37, 37, offset=0.1) is table


@pytest.mark.parametrize("size", [(20, 11), (7, 29), (13, 17), (56, 70)])
def test_opencv_cubic_matches_cv2(ref, size):
    out = resize.resize_opencv_cubic(jnp.asarray(ref["image"]), size)
    np.testing.assert_allclose(np.asarray(out), ref[f"cv2_cubic_{size[0]}x{size[1]}"], atol=2e-6)


@pytest.mark.parametrize("size", [(20, 11), (7, 29), (13, 17), (56, 70)])
def test_bilinear_align_corners_matches_torch(ref, size):
    out = resize.resize_bilinear_align_corners(jnp.asarray(ref["image"]), size)
    np.testing.assert_allclose(np.asarray(out), ref[f"torch_bilinear_ac_{size[0]}x{size[1]}"], atol=2e-6)


def test_bilinear_align_corners_keeps_corners_and_linear_ramps():
    ramp = np.add.outer(np.arange(5.0), 10 * np.arange(4.0)).astype(np.float32)[..., None]  # f(y, x) = y + 10x
    out = np.asarray(resize.resize_bilinear_align_corners(jnp.asarray(ramp), (9, 7)))[..., 0]
    y, x = np.meshgrid(np.linspace(0, 4, 9), np.linspace(0, 3, 7), indexing="ij")
    np.testing.assert_allclose(out, y + 10 * x, atol=1e-5)


def test_cubic_taps_are_a_partition_of_unity_and_identity_at_scale_one():
    for idx, w in (resize.opencv_cubic_taps(17, 40), resize.torch_bicubic_taps(37, 9, 9.1 / 37)):
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert idx.min() >= 0
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5, 2)).astype(np.float32))
    np.testing.assert_array_equal(resize.apply_taps(x, resize.opencv_cubic_taps(6, 6), 0), x)
    np.testing.assert_array_equal(resize.apply_taps(x, resize.bilinear_align_corners_taps(5, 5), 1), x)


@pytest.mark.parametrize("size", [(20, 11), (56, 70), (30, 30)])  # (30, 30): the width is kept
def test_uint8_frames_resize_to_float32_as_their_float32_copy(size):
    """Each tap reads the uint8 rows as float32 (then weighs them as before): the same sums as
    resizing the frames converted first, on the device and in NumPy."""
    frames = np.random.default_rng(2).integers(0, 256, size=(2, 33, 30, 3), dtype=np.uint8)
    expected = np.asarray(resize.resize_opencv_cubic(jnp.asarray(frames, jnp.float32), size))
    out = resize.resize_opencv_cubic(jnp.asarray(frames), size, dtype=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), expected)
    host = taps.resize_2d(frames, size, (-3, -2), taps.opencv_cubic_taps, dtype=np.float32)
    assert host.dtype == np.float32
    np.testing.assert_allclose(host, expected, rtol=1e-6, atol=1e-4)  # float32 sums in another order: 1e-4 of 255
