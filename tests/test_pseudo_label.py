"""Pseudo-labelling an image folder: Depth Anything V2's image path, resume, atomic labels, the builder."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from vda_jax.data import builders, pseudo_label
from vda_jax.inference.preprocess import network_size, preprocess
from vda_jax.ops.resize import resize_bilinear_align_corners

INPUT = 28
# Different image sizes that share the network input (28, 42): one compiled model step.
IMAGES = {"a/x1.png": (20, 30), "a/x10.jpg": (20, 30), "a/x2.png": (22, 28)}


def write_images(root):
    for i, (name, (h, w)) in enumerate(IMAGES.items()):
        os.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"{root}/{name}")


def read_image(path):
    return np.asarray(Image.open(path).convert("RGB"))


@nnx.jit
def forward(model, x):
    return model(x)


def official_image_path(model, image):
    """Depth Anything V2 ``infer_image``: network-size input, one frame, depth resized back (align_corners)."""
    x = preprocess(jnp.asarray(image), network_size(image.shape[:2], INPUT))
    depth = forward(model, x[None, None])[0, 0]
    return np.asarray(resize_bilinear_align_corners(depth, image.shape[:2], axes=(-2, -1)))


@pytest.fixture(scope="module")
def labelled(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    write_images(root / "images")
    count = pseudo_label.pseudo_label(tiny_model, str(root / "images"), str(root / "out"), input_size=INPUT,
                                      batch_size=2, progress=False)
    return root, count


def test_labels_are_the_image_path_of_the_teacher(tiny_model, labelled):
    root, count = labelled
    assert count == 3 and {network_size(size, INPUT) for size in IMAGES.values()} == {(28, 42)}
    for name, size in IMAGES.items():
        label = np.load(pseudo_label.label_path(str(root / "out"), name))
        assert label.dtype == np.float16 and label.shape == size
        expected = official_image_path(tiny_model, read_image(root / "images" / name))
        # float16 rounding (2^-11 relative) on top of float32 noise between batched and single runs.
        np.testing.assert_allclose(label.astype(np.float32), expected, rtol=2**-11, atol=1e-4 * expected.max(),
                                   err_msg=name)


def test_the_builder_reads_the_labels(labelled):
    root, _ = labelled
    config = builders.PseudoLabelConfig(name="teacher")
    builders.prepare(builders.VdaPseudoLabels, str(root / "tfds"), config=config, source_dir=str(root / "out"))
    records = tfds.data_source("vda_pseudo_labels/teacher", split="train", data_dir=str(root / "tfds"))
    assert len(records) == len(IMAGES)
    for record, name in zip(records, ["a/x1.png", "a/x2.png", "a/x10.jpg"]):  # natural order
        np.testing.assert_array_equal(record["rgb"], read_image(root / "images" / name))
        np.testing.assert_array_equal(record["depth"], np.load(pseudo_label.label_path(str(root / "out"), name)))


def test_rerun_skips_labelled_images(tiny_model, labelled):
    root, _ = labelled
    out = str(root / "out")
    done = {name: os.stat(pseudo_label.label_path(out, name)).st_mtime_ns for name in IMAGES}
    run = functools.partial(pseudo_label.pseudo_label, tiny_model, str(root / "images"), out, input_size=INPUT,
                            batch_size=2, progress=False)
    assert run() == 0
    os.remove(pseudo_label.label_path(out, "a/x2.png"))
    assert run() == 1
    for name in ("a/x1.png", "a/x10.jpg"):
        assert os.stat(pseudo_label.label_path(out, name)).st_mtime_ns == done[name]
    assert os.path.exists(pseudo_label.label_path(out, "a/x2.png"))


def test_an_interrupted_write_leaves_no_label(tiny_model, tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    real_save = np.save

    def failing_save(path, array):
        if "x2" in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY half a file")
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(pseudo_label.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        pseudo_label.pseudo_label(tiny_model, str(tmp_path / "images"), str(tmp_path / "out"), input_size=INPUT,
                                  batch_size=2, progress=False)
    assert sorted(os.listdir(tmp_path / "out" / "depth" / "a")) == ["x1.npy"]
    monkeypatch.undo()
    assert pseudo_label.pseudo_label(tiny_model, str(tmp_path / "images"), str(tmp_path / "out"), input_size=INPUT,
                                     batch_size=2, progress=False) == 2


def test_bad_folders_name_the_file(tiny_model, tmp_path):
    write_images(tmp_path / "images")
    label = functools.partial(pseudo_label.pseudo_label, tiny_model, str(tmp_path / "images"), str(tmp_path / "out"),
                              input_size=INPUT, progress=False)
    (tmp_path / "images/b").mkdir()
    (tmp_path / "images/b/broken.png").write_bytes(b"not a png")
    png = (tmp_path / "images/a/x1.png").read_bytes()
    (tmp_path / "images/b/cut.png").write_bytes(png[: len(png) // 2])  # a valid header, truncated data
    # Every readable image is labelled; the unreadable ones are all named.
    with pytest.raises(pseudo_label.UnreadableImagesError,
                       match=r"labelled 3 image\(s\), but 2 could not be read: cannot read image .*images/b/broken"
                             r"\.png.*; cannot read image .*images/b/cut\.png"):
        label()
    assert sorted(os.listdir(tmp_path / "out" / "depth" / "a")) == ["x1.npy", "x10.npy", "x2.npy"]
    (tmp_path / "images/b/cut.png").unlink()
    (tmp_path / "images/b/broken.png").unlink()
    (tmp_path / "images/a/x1.jpg").write_bytes(png)
    with pytest.raises(ValueError, match=r"a/x1\.(png|jpg) and a/x1\.(png|jpg) .* would share one label"):
        label()
    (tmp_path / "images/a/x1.jpg").unlink()
    with pytest.raises(ValueError, match=r"no images \(\.png/\.jpg/\.jpeg\) under"):
        pseudo_label.pseudo_label(tiny_model, str(tmp_path / "images/b"), str(tmp_path / "out2"))
    os.makedirs(tmp_path / "out3/images")
    with pytest.raises(ValueError, match=r"out3/images exists and is not .*; choose another output folder"):
        pseudo_label.pseudo_label(tiny_model, str(tmp_path / "images/a"), str(tmp_path / "out3"))


def test_compiles_once_per_network_size(tiny_model, tmp_path):
    """5 image sizes sharing 2 network sizes (at an input size no other test compiles): 2 compiles."""
    sizes = {(30, 40): (42, 56), (36, 48): (42, 56), (45, 60): (42, 56), (40, 30): (56, 42), (48, 36): (56, 42)}
    assert {size: network_size(size, 42, limit_aspect=False) for size in sizes} == sizes
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i, (h, w) in enumerate(sizes):
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"images/{i}_{j}.png")
    compiles = []

    def record(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        count = pseudo_label.pseudo_label(tiny_model, str(tmp_path / "images"), str(tmp_path / "out"), input_size=42,
                                          batch_size=2, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert count == 10 and len(compiles) == 2
