"""`vda-jax infer` end to end on videos the test writes: outputs, batching, resume and bad input."""

import os

import numpy as np
import pytest

from vda_jax import cli
from vda_jax.assets import SAMPLE_RENDER
from vda_jax.checkpoint import load_checkpoint
from vda_jax.data.synthetic import render_video
from vda_jax.eval.metrics import depth_metrics
from vda_jax.inference.video import infer_video_depth
from vda_jax.io.video import VideoWriter, read_frames


def _write_video(path, frames, fps=10):
    with VideoWriter(str(path), fps) as writer:
        writer.write(frames)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:40, :56]
    paths = []
    for i, n in enumerate([30, 12]):
        frames = np.stack([(128 + 100 * np.sin((x + 2 * t + 5 * i) / 6.0 + y / 9.0))[..., None]
                           * np.array([1.0, 0.7, 0.4]) for t in range(n)]).astype(np.uint8)
        frames = np.clip(frames + rng.integers(0, 8, frames.shape), 0, 255).astype(np.uint8)
        paths.append(root / f"clip{i}.mp4")
        _write_video(paths[-1], frames)
    return paths


def test_infer_writes_every_output_and_matches_the_library(tiny_model_dir, videos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["infer", *map(str, videos), "--checkpoint", str(tiny_model_dir), "--output-dir", str(out),
            "--input-size", "28", "--save-npz", "--batch-size", "2", "--quiet"]
    assert cli.main(args) == 0
    assert sorted(os.listdir(out)) == ["clip0_depths.npz", "clip0_src.mp4", "clip0_vis.mp4",
                                       "clip1_depths.npz", "clip1_src.mp4", "clip1_vis.mp4"]
    model = load_checkpoint(str(tiny_model_dir))
    for video in videos:
        name = video.stem
        depths = np.load(out / f"{name}_depths.npz")["depths"]
        expected = infer_video_depth(model, np.stack(list(read_frames(str(video), max_res=1280))), input_size=28)
        np.testing.assert_allclose(depths, expected, rtol=1e-5, atol=1e-5 * expected.max())
        assert len(list(read_frames(str(out / f"{name}_vis.mp4")))) == len(depths)
    # A second run finds everything done and skips it.
    assert cli.main(args) == 0
    assert capsys.readouterr().err.count("outputs exist, skipping") == 2


def test_unreadable_video_fails_alone(tiny_model_dir, videos, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    code = cli.main(["infer", str(bad), str(videos[1]), "--checkpoint", str(tiny_model_dir), "--output-dir", str(out),
                     "--input-size", "28", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["clip1_src.mp4", "clip1_vis.mp4"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["infer", str(tmp_path / "missing.mp4"), "--checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vda-jax infer: error:") and "missing.mp4" in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli.main(["infer", "x.mp4", "--batch-size", "0"])


def test_bundled_model_gives_depth_for_the_sample(tmp_path):
    """`vda-jax infer --sample` with no checkpoint: the bundled model on the bundled video.

    The sample is a render of our scene generator, so its true depth is known: the
    prediction must be depth-like, far better than a ground-plane prior (disparity
    growing down the image), the best guess without looking at the pixels.
    """
    out = tmp_path / "out"
    assert cli.main(["infer", "--sample", "--output-dir", str(out), "--save-npz", "--quiet"]) == 0
    depths = np.load(out / "sample_depths.npz")["depths"]
    truth = render_video(**SAMPLE_RENDER)
    assert depths.shape == truth["depth"].shape and np.isfinite(depths).all()
    assert len(list(read_frames(str(out / "sample_vis.mp4")))) == len(depths)
    scores = depth_metrics(depths, truth["depth"], max_depth=80.0, mask=truth["mask"])
    rows = np.broadcast_to(np.arange(1, depths.shape[1] + 1, dtype=np.float32)[:, None], depths.shape)
    prior = depth_metrics(rows, truth["depth"], max_depth=80.0, mask=truth["mask"])
    assert scores["delta1"] > prior["delta1"] + 0.1 and scores["abs_rel"] < 0.5 * prior["abs_rel"]
