"""Video decoding/encoding and depth outputs, on tiny videos written here."""

import importlib.util
import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from vda_jax.io import outputs
from vda_jax.io.video import VideoError, VideoInfo, VideoWriter, expand_inputs, probe, read_frames, source_name

# Matplotlib's inferno entries 0, 128 and 255, times 255 and truncated (as the official visualisation does).
INFERNO_FIRST, INFERNO_128, INFERNO_LAST = (0, 0, 3), (187, 55, 84), (252, 254, 164)


def _smooth_frames(num_frames, height, width):
    t, y, x, c = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return (128 + 80 * np.sin(x / 16 + y / 24 + t / 5 + c / 2)).astype(np.uint8)


def _write_video(path, frames, fps=30):
    with VideoWriter(str(path), fps) as writer:
        writer.write(frames)
    return str(path)


@pytest.fixture(scope="module")
def counter_video(tmp_path_factory):
    """24 flat frames at 30 fps, 40x64; frame i has grey level 10 * i, so its index can be read back."""
    frames = np.broadcast_to((10 * np.arange(24, dtype=np.uint8))[:, None, None, None], (24, 40, 64, 3))
    return _write_video(tmp_path_factory.mktemp("counter") / "counter.mp4", frames)


def _indices(frames):
    return [round(float(frame.mean()) / 10) for frame in frames]


@pytest.mark.parametrize("height, width", [(48, 64), (33, 45)])
def test_video_round_trip(tmp_path, height, width):
    frames = _smooth_frames(10, height, width)
    path = tmp_path / "smooth.mp4"
    with VideoWriter(str(path), fps=30) as writer:
        writer.write(frames[0])
        writer.write(frames[1:])
        assert not path.exists()
    decoded = np.stack(list(read_frames(str(path))))
    # yuv420p needs even sizes: odd ones come back padded by one row/column.
    assert decoded.shape == (10, height + height % 2, width + width % 2, 3)
    error = np.abs(decoded[:, :height, :width].astype(int) - frames)
    assert error.mean() < 2.5
    assert os.listdir(tmp_path) == ["smooth.mp4"]


def test_probe(counter_video):
    assert probe(counter_video) == VideoInfo(counter_video, num_frames=24, fps=30.0, height=40, width=64)


@pytest.mark.parametrize(
    "max_res, max_len, target_fps, indices, shape, fps",
    [
        (-1, -1, -1, list(range(24)), (40, 64), 30.0),
        (-1, -1, 10, list(range(0, 24, 3)), (40, 64), 10.0),  # stride round(30 / 10) = 3
        (-1, -1, 7, list(range(0, 24, 4)), (40, 64), 7.5),  # stride round(30 / 7) = 4
        (-1, -1, 8, list(range(0, 24, 4)), (40, 64), 7.5),  # stride round(3.75) = 4, not 3
        (-1, -1, 60, list(range(24)), (40, 64), 30.0),  # stride max(round(0.5), 1) = 1
        (-1, 5, 10, [0, 3, 6, 9, 12], (40, 64), 10.0),  # max_len counts kept frames
        (-1, 100, -1, list(range(24)), (40, 64), 30.0),
        (50, -1, -1, list(range(24)), (32, 50), 30.0),  # round(40 * 50/64) = 31, bumped to even; round(50) = 50
        (35, 3, -1, [0, 1, 2], (22, 36), 30.0),  # round(21.875) = 22; round(35) = 35, bumped to 36
        (64, -1, -1, list(range(24)), (40, 64), 30.0),  # longer side not above max_res: untouched
    ],
)
def test_read_options_follow_official_semantics(counter_video, max_res, max_len, target_fps, indices, shape, fps):
    frames = list(read_frames(counter_video, max_res=max_res, max_len=max_len, target_fps=target_fps))
    assert _indices(frames) == indices
    assert {frame.shape for frame in frames} == {(*shape, 3)}
    assert all(frame.dtype == np.uint8 for frame in frames)
    expected = VideoInfo(counter_video, len(indices), fps, *shape)
    assert probe(counter_video).subsampled(max_res=max_res, max_len=max_len, target_fps=target_fps) == expected


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for number in (1, 2, 10):  # sorts as 1, 10, 2 as plain strings
        Image.fromarray(np.full((40, 64, 3), 10 * number, np.uint8)).save(folder / f"frame_{number}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_image_sequences_are_naturally_sorted(image_folder):
    for source in (image_folder, image_folder / "frame_*.png", image_folder / "frame_%d.png"):
        frames = list(read_frames(str(source)))
        assert [int(frame[0, 0, 0]) for frame in frames] == [10, 20, 100]
        assert probe(str(source)) == VideoInfo(str(source), 3, 30.0, 40, 64)
    resized = list(read_frames(str(image_folder), max_res=50, target_fps=15))
    assert [frame.shape for frame in resized] == [(32, 50, 3)] * 2
    assert [int(frame[0, 0, 0]) for frame in resized] == [10, 100]


def test_expand_inputs(tmp_path, image_folder, counter_video):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("clip_10.mp4", "clip_9.mov"):
        (videos / name).write_bytes(b"")
    (tmp_path / "README.txt").write_text("neither a video nor an image")
    expected = [str(image_folder), str(videos / "clip_9.mov"), str(videos / "clip_10.mp4")]  # natural order
    assert expand_inputs([str(videos), str(image_folder), str(videos)]) == expected
    assert expand_inputs([str(tmp_path / "*")]) == expected
    pattern = str(image_folder / "*.png")
    assert set(expand_inputs([pattern, counter_video])) == {pattern, counter_video}
    assert expand_inputs([str(image_folder / "frame_%d.png")]) == [str(image_folder / "frame_%d.png")]
    for missing in ("missing.mp4", "missing_*.mp4", "missing_%04d.png"):
        with pytest.raises(VideoError, match=missing.replace("*", r"\*")):
            expand_inputs([str(tmp_path / missing)])


def _bad_source(directory, kind):
    """A source of the given kind that cannot be read, and the file name its error must give."""
    if kind == "missing":
        return directory / "missing.mp4", "missing.mp4"
    if kind == "unmatched_pattern":
        return directory / "missing_%05d.png", "missing_%05d.png"
    if kind == "zero_frames":
        path = directory / "zero_frames.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=s=32x32:r=30",
                        "-frames:v", "0", str(path)], check=True)
        return path, path.name
    if kind == "empty_folder":
        (directory / "empty_folder").mkdir()
        return directory / "empty_folder", "empty_folder"
    if kind == "corrupt_image":
        (directory / "frames").mkdir()
        (directory / "frames" / "frame_0.png").write_bytes(b"not a png")
        return directory / "frames", "frame_0.png"
    path = directory / f"{kind}.mp4"
    path.write_bytes({"garbage": b"not a video" * 10, "empty": b""}[kind])
    return path, path.name


@pytest.mark.parametrize(
    "kind", ["missing", "garbage", "empty", "zero_frames", "empty_folder", "unmatched_pattern", "corrupt_image"])
def test_unreadable_sources_raise_one_line_video_error(tmp_path, kind):
    source, name = _bad_source(tmp_path, kind)
    with pytest.raises(VideoError) as error:
        list(read_frames(str(source)))
    assert isinstance(error.value, ValueError)
    assert name in str(error.value)
    assert "\n" not in str(error.value)


def test_video_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(str(tmp_path / "out.mp4"), fps=30) as writer:
            writer.write(_smooth_frames(3, 16, 16))
            raise RuntimeError("boom")
    with pytest.raises(VideoError, match="no frames"):
        with VideoWriter(str(tmp_path / "empty.mp4"), fps=30):
            pass
    assert os.listdir(tmp_path) == []


SUBME = {"ultrafast": 0, "veryfast": 2, "medium": 7}  # x264's subpixel refinement per preset


@pytest.mark.parametrize("preset", SUBME)
def test_video_presets_reach_x264(tmp_path, preset, x264_subme):
    frames = _smooth_frames(3, 16, 24)
    src = _write_video(tmp_path / "src.mp4", frames) if preset == "veryfast" else None  # the default
    with VideoWriter(str(tmp_path / "out.mp4"), fps=30, preset=preset) as writer:
        writer.write(frames)
    with outputs.DepthVisWriter(str(tmp_path / "vis.mp4"), fps=30, preset=preset) as writer:
        writer.write(frames[..., 0].astype(np.float32))
    for name in ("out.mp4", "vis.mp4") + (("src.mp4",) if src else ()):
        assert x264_subme(tmp_path / name) == SUBME[preset], name
    assert np.abs(np.stack(list(read_frames(str(tmp_path / "out.mp4")))).astype(int) - frames).mean() < 2.5


def test_unknown_video_preset(tmp_path):
    for make in (lambda: VideoWriter(str(tmp_path / "a.mp4"), 30, preset="quick"),
                 lambda: outputs.DepthVisWriter(str(tmp_path / "a.mp4"), 30, preset="quick")):
        with pytest.raises(ValueError, match="unknown x264 preset 'quick'; use one of ultrafast,") as error:
            make()
        assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_colorize():
    image = outputs.colorize(np.array([[2.0, 5.0, 1.0, 9.0]]), 2, 5)
    assert image.shape == (1, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0], [INFERNO_FIRST, INFERNO_LAST, INFERNO_FIRST, INFERNO_LAST])  # ends, clipped
    np.testing.assert_array_equal(outputs.colorize(np.array([128.0]), 0, 255), [INFERNO_128])
    np.testing.assert_array_equal(outputs.colorize(np.array([3.0, 4.0]), 3, 3), [INFERNO_FIRST] * 2)  # empty range
    gray = outputs.colorize(np.array([2.0, 3.5, 5.0]), 2, 5, grayscale=True)
    assert gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, [[0] * 3, [127] * 3, [255] * 3])  # 1.5 / 3 * 255 = 127.5, truncated


def test_depth_vis_uses_the_whole_video_range(tmp_path):
    path = tmp_path / "vis.mp4"
    with outputs.DepthVisWriter(str(path), fps=30) as writer:
        writer.write(np.full((16, 24), 1.0))
        writer.write(np.stack([np.full((16, 24), 2.0), np.full((16, 24), 3.0)]))
        assert os.listdir(tmp_path) == []  # the spool is an anonymous file
    frames = np.stack(list(read_frames(str(path)))).astype(int)
    assert frames.shape == (3, 16, 24, 3)
    # Per-frame normalisation would map every flat frame to the first colour.
    np.testing.assert_allclose(frames[0].mean((0, 1)), INFERNO_FIRST, atol=6)
    np.testing.assert_allclose(frames[2].mean((0, 1)), INFERNO_LAST, atol=6)
    assert os.listdir(tmp_path) == ["vis.mp4"]


def test_npz_writer(tmp_path):
    path = tmp_path / "depth.npz"
    depth = np.random.default_rng(0).uniform(0, 80, (5, 6, 7)).astype(np.float32)
    with outputs.NpzDepthWriter(str(path)) as writer:
        writer.write(depth[0])
        writer.write(depth[1:])
        assert os.listdir(tmp_path) == []
    with np.load(path) as archive:
        assert archive.files == ["depths"]
        loaded = archive["depths"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, depth)

    with pytest.raises(RuntimeError):
        with outputs.NpzDepthWriter(str(tmp_path / "broken.npz")) as writer:
            writer.write(depth)
            raise RuntimeError
    assert os.listdir(tmp_path) == ["depth.npz"]


def test_point_cloud_ply(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 10, (4, 6)).astype(np.float32)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    fx, fy = 3.0, 5.0
    path = tmp_path / "cloud.ply"
    outputs.save_point_cloud_ply(str(path), depth, rgb, fx, fy)

    data = path.read_bytes()
    header, body = data.split(b"end_header\n")
    assert header.decode().splitlines() == [
        "ply", "format binary_little_endian 1.0", "element vertex 24", "property float x", "property float y",
        "property float z", "property uchar red", "property uchar green", "property uchar blue"]
    vertex = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    points = np.frombuffer(body, vertex)
    assert len(points) == 24
    centre = points[2 * 6 + 3]  # pixel (u, v) = (W/2, H/2)
    assert (centre["x"], centre["y"], centre["z"]) == (0.0, 0.0, depth[2, 3])
    corner = points[0]
    z = depth[0, 0]
    np.testing.assert_allclose([corner["x"], corner["y"], corner["z"]], [-3 / fx * z, -2 / fy * z, z])
    np.testing.assert_array_equal(np.stack([points["red"], points["green"], points["blue"]], -1), rgb.reshape(-1, 3))


def test_exr_writer_names_the_extra_when_openexr_is_missing(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec

    def find_spec_without_openexr(name, *args):
        return None if name == "OpenEXR" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_openexr)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[exr\]"'):
        outputs.ExrDepthWriter(str(tmp_path / "clip_depths_exr"))
    assert os.listdir(tmp_path) == []


def test_truncated_video_fails_with_its_frame_counts(tmp_path):
    """A faststart mp4 cut in half: its header still declares 70 frames, the decoder stops early."""
    whole = tmp_path / "whole.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=s=48x32:r=30",
                    "-frames:v", "70", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(whole)], check=True)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    assert len(list(read_frames(str(whole)))) == 70
    assert len(list(read_frames(str(cut), max_len=3))) == 3  # frames before the cut are fine
    with pytest.raises(VideoError, match=r"cut\.mp4.* ends after \d+ of the 70 frames .* truncated") as error:
        list(read_frames(str(cut)))
    assert "\n" not in str(error.value)


def test_source_names(image_folder, counter_video, monkeypatch):
    assert source_name(counter_video) == "counter"
    assert source_name(str(image_folder)) == source_name(str(image_folder) + "/") == "frames"
    assert source_name(str(image_folder / "frame_%d.png")) == "frames"  # named after the folder, not the pattern
    assert source_name(str(image_folder / "frame_*.png")) == "frames"
    monkeypatch.chdir(image_folder)
    assert source_name("frame_%d.png") == "frames"

