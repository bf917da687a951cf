"""TFDS builders: every layout written to a temp folder, built as ArrayRecord and read back."""

import io
import os
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vda_jax.data import builders, files
from vda_jax.data.synthetic import render_video


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_jpg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def write_npy(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, array)


def rgb(seed, h=6, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def depth_u16(seed, h=6, w=8):
    return np.random.default_rng(seed).integers(0, 30000, (h, w)).astype(np.uint16)


def read(name, data_dir, split):
    return tfds.data_source(name, split=split, data_dir=str(data_dir))


def metadata(name, data_dir):
    return tfds.builder(name, data_dir=str(data_dir)).info.metadata


def test_synthetic_builder_stores_the_rendered_videos(tmp_path):
    config = builders.SyntheticConfig(name="t", height=12, width=16, num_frames=3, num_videos=(2, 1, 0), seed=5)
    builders.prepare(builders.VdaSynthetic, str(tmp_path), config=config)
    train = read("vda_synthetic/t", tmp_path, "train")
    assert len(train) == 6 and len(read("vda_synthetic/t", tmp_path, "validation")) == 3
    assert metadata("vda_synthetic/t", tmp_path)["videos"]["train"]["lengths"] == [3, 3]
    video = render_video(builders.video_seed(5, "train", 1), 3, 12, 16)
    for f in range(3):
        record = train[3 + f]
        assert (record["video"], record["frame"]) == (1, f)
        np.testing.assert_array_equal(record["rgb"], video["frames"][f])
        np.testing.assert_array_equal(record["depth"], video["depth"][f].astype(np.float16))
        np.testing.assert_array_equal(record["dynamic"], video["dynamic"][f])
        np.testing.assert_array_equal(record["K"], video["K"][f])
        np.testing.assert_array_equal(record["pose"], video["pose"][f])
    assert "tensorflow" not in sys.modules


def make_folder_video(root, name, num_frames, *, depth_ext=".png", jpg=False):
    for f in range(num_frames):
        image = rgb(f)
        (write_jpg if jpg else write_png)(f"{root}/{name}/rgb/frame_{f:02d}.{'jpg' if jpg else 'png'}", image)
        if depth_ext == ".png":
            write_png(f"{root}/{name}/depth/frame_{f:02d}.png", depth_u16(f))
        else:
            write_npy(f"{root}/{name}/depth/frame_{f:02d}.npy", depth_u16(f).astype(np.float32))


def test_folder_builder_reads_png16_npy_jpeg_and_cameras(tmp_path):
    src = tmp_path / "src"
    make_folder_video(src / "train", "a", 3)
    make_folder_video(src / "train", "b", 2, depth_ext=".npy", jpg=True)
    make_folder_video(src / "validation", "c", 2)
    (src / "train/a/intrinsics.txt").write_text("50 51 3.5 2.5\n")
    poses = np.random.default_rng(0).normal(size=(3, 12))
    np.savetxt(src / "train/a/poses.txt", poses)
    config = builders.FolderConfig(name="mine", depth_scale=1000.0, max_depth=20.0)
    builders.prepare(builders.VdaVideoFolder, str(tmp_path / "tfds"), config=config, source_dir=str(src))

    train = read("vda_video_folder/mine", tmp_path / "tfds", "train")
    assert len(train) == 5 and len(read("vda_video_folder/mine", tmp_path / "tfds", "validation")) == 2
    meta = metadata("vda_video_folder/mine", tmp_path / "tfds")
    assert meta["videos"]["train"] == {"names": ["a", "b"], "lengths": [3, 2]} and meta["max_depth"] == 20.0
    np.testing.assert_array_equal(train[1]["rgb"], rgb(1))
    np.testing.assert_allclose(train[1]["depth"], depth_u16(1) / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(train[1]["K"], [[50, 0, 3.5], [0, 51, 2.5], [0, 0, 1]])
    np.testing.assert_allclose(train[2]["pose"][:3], poses[2].reshape(3, 4), rtol=1e-6)
    np.testing.assert_array_equal(train[2]["pose"][3], [0, 0, 0, 1])
    # Video b: JPEG frames are stored as they are; .npy depth (in mm like the PNGs); no cameras.
    np.testing.assert_array_equal(train[4]["rgb"], np.asarray(Image.open(src / "train/b/rgb/frame_01.jpg")))
    np.testing.assert_allclose(train[4]["depth"], depth_u16(1) / 1000.0, rtol=1e-6)
    assert (train[4]["video"], train[4]["frame"]) == (1, 1)
    assert np.isnan(train[4]["K"]).all() and np.isnan(train[4]["pose"]).all()


def build_folder(tmp_path, src):
    builders.prepare(
        builders.VdaVideoFolder, str(tmp_path / "tfds"), config=builders.FolderConfig(name="x"), source_dir=str(src)
    )


def test_folder_builder_missing_depth(tmp_path):
    make_folder_video(tmp_path / "src", "v", 3)
    os.remove(tmp_path / "src/v/depth/frame_01.png")
    with pytest.raises(ValueError, match=r"no depth map for frame .*v/rgb/frame_01\.png"):
        build_folder(tmp_path, tmp_path / "src")


def test_folder_builder_size_mismatch(tmp_path):
    make_folder_video(tmp_path / "src", "v", 2)
    write_png(f"{tmp_path}/src/v/depth/frame_01.png", depth_u16(0, h=5))
    with pytest.raises(ValueError, match=r"frame_01\.png is 6x8 but its depth .*frame_01\.png is 5x8"):
        build_folder(tmp_path, tmp_path / "src")


def test_folder_builder_unreadable_files(tmp_path):
    make_folder_video(tmp_path / "src", "v", 2)
    (tmp_path / "src/v/rgb/frame_01.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*v/rgb/frame_01\.png"):
        build_folder(tmp_path, tmp_path / "src")


def test_folder_builder_bad_depth_and_camera_files(tmp_path):
    make_folder_video(tmp_path / "src", "v", 2)
    write_png(f"{tmp_path}/src/v/depth/frame_00.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"frame_00\.png has mode L; expected a 16-bit"):
        build_folder(tmp_path, tmp_path / "src")
    (tmp_path / "src/v/poses.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"v/poses\.txt holds 1 rows of 3 numbers; expected 2 rows"):
        build_folder(tmp_path, tmp_path / "src")


def test_exr_depth_without_openexr_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "OpenEXR", None)  # import fails as if not installed
    with pytest.raises(
        ModuleNotFoundError, match=re.escape(f"cannot read {tmp_path}/d.exr: EXR depth needs the OpenEXR")
    ):
        files.read_depth(str(tmp_path / "d.exr"))


def translation(x):
    pose = np.eye(4)
    pose[:3, 3] = x
    return pose


def write_benchmark(root, config):
    """A tiny dataset as the official extraction scripts lay it out; returns its (rgb, depth) paths."""
    if config == "kitti":
        pairs = [(f"seq_a/rgb/{i:010d}.png", f"seq_a/depth/{i:010d}.png") for i in range(3)]
    elif config == "bonn":  # rgb and depth have different timestamps; 32 frames, the benchmark uses 30..
        pairs = [(f"s/rgb/1548.{i + 100}.png", f"s/depth/1548.{i + 105}.png") for i in range(32)]
    elif config.startswith("scannet"):
        folder = "color_origin" if config == "scannet_tae" else "color"
        pairs = [(f"scene0000_00/{folder}/{i}.jpg", f"scene0000_00/depth/{i}.png") for i in range(5)]
    elif config == "nyuv2_500":
        pairs = [(f"kitchen/rgb/{i:05d}.jpg", f"kitchen/depth/{i:05d}.png") for i in range(2)]
    else:
        pairs = [(f"clean/alley_1/frame_{i:04d}.png", f"depth/alley_1/frame_{i:04d}.png") for i in range(1, 3)]
    for i, (image, depth) in enumerate(pairs):
        (write_jpg if image.endswith(".jpg") else write_png)(f"{root}/{image}", rgb(i))
        write_png(f"{root}/{depth}", depth_u16(i))
    if config.startswith("scannet"):
        os.makedirs(f"{root}/scene0000_00/intrinsic")
        np.savetxt(f"{root}/scene0000_00/intrinsic/intrinsic_depth.txt", np.diag([577.0, 578.0, 1.0, 1.0]))
        os.makedirs(f"{root}/scene0000_00/pose")
        for i in range(5):
            np.savetxt(f"{root}/scene0000_00/pose/{i}.txt", translation(i))
    return pairs


# Per config: the frames the benchmark uses, then its depth scale, cap and crop as in the official
# extraction (eval_utils.gen_json) and evaluation (eval.py, eval_tae.py) scripts.
@pytest.mark.parametrize(
    "config,used,scale,cap,crop",
    [
        ("kitti", [0, 1, 2], 256.0, 80.0, (0, 374, 0, 1242)),
        ("bonn", [30, 31], 5000.0, 10.0, (0, 480, 0, 640)),
        ("scannet", [0, 3], 1000.0, 10.0, (8, -8, 11, -11)),
        ("scannet_tae", [0, 1, 2, 3, 4], 1000.0, 10.0, (8, -8, 11, -11)),
        ("nyuv2_500", [0, 1], 6000.0, 10.0, (45, 471, 41, 601)),
        ("sintel", [0, 1], 65535 / 650, 70.0, (0, 436, 0, 1024)),
    ],
)
def test_benchmark_layouts(tmp_path, config, used, scale, cap, crop):
    pairs = write_benchmark(tmp_path / "src", config)
    builders.prepare(builders.VdaBenchmark, str(tmp_path / "tfds"), config=config, source_dir=str(tmp_path / "src"))
    test = read(f"vda_benchmark/{config}", tmp_path / "tfds", "test")
    meta = metadata(f"vda_benchmark/{config}", tmp_path / "tfds")
    assert len(test) == len(used) and meta["videos"]["test"]["lengths"] == [len(used)]
    assert meta["max_depth"] == cap and tuple(meta["gt_crop"]) == crop and meta["min_depth"] == 1e-3
    assert meta["crop_prediction"] == (config == "scannet_tae")
    for record, i in zip(test, used):
        np.testing.assert_allclose(record["depth"], depth_u16(i) / scale, rtol=1e-6)
        np.testing.assert_array_equal(record["rgb"], np.asarray(Image.open(f"{tmp_path}/src/{pairs[i][0]}")))
    if config.startswith("scannet"):
        np.testing.assert_allclose(test[1]["K"], np.diag([577.0, 578.0, 1.0]))
        np.testing.assert_allclose(test[1]["pose"], translation(used[1]))
    else:
        assert np.isnan(test[0]["K"]).all()


def test_benchmark_unpaired_frames(tmp_path):
    write_benchmark(tmp_path / "src", "bonn")
    os.remove(tmp_path / "src/s/depth/1548.110.png")
    with pytest.raises(ValueError, match=r"32 frames in .*s/rgb but 31 depth maps in .*s/depth"):
        builders.prepare(builders.VdaBenchmark, str(tmp_path / "tfds"), config="bonn", source_dir=str(tmp_path / "src"))


def test_pseudo_label_builder(tmp_path):
    src = tmp_path / "src"
    names = ["a/x1", "a/x2", "b/y"]
    for i, name in enumerate(names):
        write_jpg(f"{src}/images/{name}.jpg", rgb(i, 10, 12))
        write_npy(f"{src}/depth/{name}.npy", np.full((10, 12), i + 0.5, np.float16))
    config = builders.PseudoLabelConfig(name="teacher")
    builders.prepare(builders.VdaPseudoLabels, str(tmp_path / "tfds"), config=config, source_dir=str(src))
    train = read("vda_pseudo_labels/teacher", tmp_path / "tfds", "train")
    meta = metadata("vda_pseudo_labels/teacher", tmp_path / "tfds")
    assert len(train) == 3 and "videos" not in meta and meta["depth_kind"] == "disparity"
    for i, record in enumerate(train):
        assert (record["video"], record["frame"]) == (i, 0)
        assert record["depth"].dtype == np.float16 and (record["depth"] == i + 0.5).all()
        np.testing.assert_array_equal(record["rgb"], np.asarray(Image.open(f"{src}/images/{names[i]}.jpg")))

    os.remove(f"{src}/depth/b/y.npy")
    with pytest.raises(ValueError, match=r"no depth for image .*images/b/y\.jpg: expected .*depth/b/y\.npy"):
        builders.prepare(builders.VdaPseudoLabels, str(tmp_path / "tfds2"), config=config, source_dir=str(src))


def test_read_rgb_converts_other_modes_to_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    write_png(f"{tmp_path}/g.png", grey)
    data, size = files.read_rgb(f"{tmp_path}/g.png")
    assert size == (6, 8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.repeat(grey[..., None], 3, -1))
