"""The evaluation runner: datasets read back and scored like the official scripts, protocols, reports."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from vda_jax import cli
from vda_jax.data import builders
from vda_jax.data.synthetic import render_video
from vda_jax.eval import metrics, runner
from vda_jax.inference.video import infer_video_depth

H, W, N, INPUT = 24, 32, 12, 28  # one frame size and input size: one compiled step for the whole file
SEED = 3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = builders.SyntheticConfig(name="t", height=H, width=W, num_frames=N, num_videos=(0, 0, 2), seed=SEED)
    builders.prepare(builders.VdaSynthetic, data_dir, config=config)
    return data_dir


def rendered(index):
    video = render_video(builders.video_seed(SEED, "test", index), N, H, W)
    video["depth"] = video["depth"].astype(np.float16).astype(np.float32)  # as stored
    return video


def direct_score(model, video, frames=slice(None), crop=(None, None, None, None)):
    """The official protocol spelled out on one video: infer, select, crop both, score."""
    top, bottom, left, right = crop
    pred = infer_video_depth(model, video["frames"], input_size=INPUT)[frames, top:bottom, left:right]
    gt = video["depth"][frames, top:bottom, left:right]
    scores = metrics.depth_metrics(pred, gt, max_depth=math.inf)
    tae = metrics.temporal_alignment_error(pred, gt, video["K"][frames], video["pose"][frames], max_depth=math.inf)
    return {**scores, "tae": tae}


def assert_scores(row, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(row, key), value, rtol=1e-5, err_msg=f"{row.name} {key}")


def test_synthetic_split_is_scored_like_the_official_protocol(tiny_model, synthetic, tmp_path):
    report = runner.evaluate(tiny_model, "vda_synthetic/t", "test", data_dir=synthetic, max_frames=10,
                             input_size=INPUT, progress=False)
    assert [(v.name, v.frames) for v in report.videos] == [("test_00000", 10), ("test_00001", 10)]
    for row, index in zip(report.videos, range(2)):
        video = rendered(index)
        video = {k: v[:10] for k, v in video.items()}
        assert_scores(row, direct_score(tiny_model, video))
    for key in ("abs_rel", "delta1", "rmse", "tae"):
        assert report.mean[key] == pytest.approx(np.mean([getattr(v, key) for v in report.videos]))

    lines = runner.format_table(report).splitlines()
    assert lines[0].split() == ["video", "frames", "AbsRel", "delta1", "RMSE", "TAE"]
    assert lines[1].split() == ["test_00000", "10", f"{report.videos[0].abs_rel:.4f}", f"{report.videos[0].delta1:.4f}",
                                f"{report.videos[0].rmse:.4f}", f"{report.videos[0].tae:.3f}"]
    assert lines[-1].split()[:2] == ["mean", "20"] and len({len(line) for line in lines}) == 1

    runner.write_json(report, str(tmp_path / "report.json"))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["mean"] == report.mean and saved["videos"][1]["tae"] == report.videos[1].tae
    assert os.listdir(tmp_path) == ["report.json"]


def test_protocol_crops_frames_and_video_count(tiny_model, synthetic, monkeypatch):
    source, metadata = runner.open_split("vda_synthetic/t", "test", synthetic)
    crop = (2, -2, 3, -3)
    protocol = {"eval_frames": [2, 9], "eval_videos": 1, "gt_crop": list(crop), "crop_prediction": True}
    monkeypatch.setattr(runner, "open_split", lambda *args: (source, {**metadata, **protocol}))
    report = runner.evaluate(tiny_model, "vda_synthetic/t", data_dir=synthetic, input_size=INPUT, progress=False)
    assert [(v.name, v.frames) for v in report.videos] == [("test_00000", 7)]
    assert_scores(report.videos[0], direct_score(tiny_model, rendered(0), slice(2, 9), crop))


def write_kitti(root, num_frames):
    rng = np.random.default_rng(0)
    for i in range(num_frames):
        os.makedirs(f"{root}/seq_a/rgb", exist_ok=True)
        os.makedirs(f"{root}/seq_a/depth", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(f"{root}/seq_a/rgb/{i:010d}.png")
        depth = rng.integers(0, 20000, (H, W)).astype(np.uint16)  # 0 = missing; /256 = metres
        Image.fromarray(depth).save(f"{root}/seq_a/depth/{i:010d}.png")


def test_benchmark_without_cameras_through_the_cli_entry(tiny_model_dir, tmp_path, capsys):
    write_kitti(tmp_path / "src", 5)
    builders.prepare(builders.VdaBenchmark, str(tmp_path / "tfds"), config="kitti", source_dir=str(tmp_path / "src"))
    output = tmp_path / "out" / "kitti.json"  # its folder is created
    capsys.readouterr()
    status = cli.main(["eval", "--checkpoint", str(tiny_model_dir), "--dataset", "vda_benchmark/kitti",
                       "--data-dir", str(tmp_path / "tfds"), "--output", str(output), "--input-size", str(INPUT),
                       "--quiet"])
    assert status == 0
    saved = json.loads(output.read_text())
    assert saved["split"] == "test" and saved["frames"] == 5 and saved["model"] == "custom"
    settings = saved["strategy"], saved["input_size"], saved["precision"], saved["max_frames"]
    assert settings == ("full", INPUT, "fp32", None)
    assert saved["videos"][0]["name"] == "seq_a" and saved["videos"][0]["tae"] is None and saved["mean"]["tae"] is None
    assert 0 < saved["mean"]["abs_rel"] and 0 <= saved["mean"]["delta1"] <= 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] == "video" and printed[1].split()[0] == "seq_a" and printed[1].split()[-1] == "-"
    assert printed[-1] == f"wrote {output}"


def test_prediction_is_resized_to_the_ground_truth_with_half_pixel_centres():
    # A disparity with a kink at the centre of a coarse pixel, sampled at the coarse pixels'
    # centres (2x coarser): half-pixel bilinear upsampling restores it exactly away from the
    # clamped border columns (invalid in the gt); corner-aligned or nearest resizing would not.
    def disparity(x):
        return 0.2 + 0.01 * np.abs(x - 21.0)

    gt = np.broadcast_to(1.0 / disparity(np.arange(2 * W) + 0.5), (3, 2 * H, 2 * W)).copy()
    gt[..., [0, -1]] = 0.0
    pred = np.broadcast_to(3.0 * disparity(2.0 * np.arange(W) + 1.0) + 1.0, (3, H, W)).astype(np.float32)
    no_cameras = np.full((3, 3, 3), np.nan), np.full((3, 4, 4), np.nan)
    score = runner.score_video("v", pred, gt, *no_cameras, runner.Protocol(max_depth=100.0))
    assert score.abs_rel < 1e-6 and score.delta1 == 1.0 and score.tae is None


def test_score_video_tae_uses_cameras_when_known():
    gt = np.full((3, H, W), 4.0) * np.linspace(0.8, 1.2, W)
    intrinsics = np.broadcast_to([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]], (3, 3, 3))
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, 0, 3] = [0.0, 0.1, 0.2]
    pred = (1.0 / gt).astype(np.float32)
    score = runner.score_video("v", pred, gt, intrinsics, poses, runner.Protocol(max_depth=10.0))
    assert score.tae == pytest.approx(metrics.temporal_alignment_error(pred, gt, intrinsics, poses, max_depth=10.0))
    one_frame = runner.score_video("v", pred[:1], gt[:1], intrinsics[:1], poses[:1], runner.Protocol(10.0))
    assert one_frame.tae is None


def test_bad_datasets_and_arguments(tiny_model, synthetic, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'vda_nothing/x'; the vda datasets are \['vda_benchmark'"):
        runner.evaluate(tiny_model, "vda_nothing/x", data_dir=synthetic)
    with pytest.raises(ValueError, match=r"vda_synthetic/small is not built in .*: pass the data directory it was"):
        runner.evaluate(tiny_model, "vda_synthetic/small", data_dir=synthetic)
    # A config that is neither predefined nor built there (tfds' own message is cut off after "match:").
    message = f"^dataset vda_synthetic/tiny is not built in {tmp_path}: .* training run renders .* WORKDIR/data"
    with pytest.raises(ValueError, match=message):
        runner.evaluate(tiny_model, "vda_synthetic/tiny", "validation", data_dir=str(tmp_path))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a training workdir given for its data folder
    with pytest.raises(ValueError, match=f"{tmp_path / 'run'} is a training workdir; its run renders synthetic data "
                                         f"into {tmp_path / 'run' / 'data'}$"):
        runner.evaluate(tiny_model, "vda_synthetic/tiny", "validation", data_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['test'\]"):
        runner.evaluate(tiny_model, "vda_synthetic/t", "validation", data_dir=synthetic)
    with pytest.raises(ValueError, match=r"max_frames must be >= 1"):
        runner.evaluate(tiny_model, "vda_synthetic/t", data_dir=synthetic, max_frames=0)
    with pytest.raises(ValueError, match=r"need metric ground-truth depth, but this dataset holds 'disparity'"):
        runner.Protocol.from_metadata({"depth_kind": "disparity"})

    src = tmp_path / "labels"
    os.makedirs(src / "images")
    os.makedirs(src / "depth")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(src / "images/a.png")
    np.save(src / "depth/a.npy", np.ones((H, W), np.float16))
    config = builders.PseudoLabelConfig(name="t", depth_kind="metric")
    builders.prepare(builders.VdaPseudoLabels, str(tmp_path / "tfds"), config=config, source_dir=str(src))
    with pytest.raises(ValueError, match=r"vda_pseudo_labels/t:train holds single images"):
        runner.evaluate(tiny_model, "vda_pseudo_labels/t", "train", data_dir=str(tmp_path / "tfds"))


def test_cli_eval_refuses_an_output_it_cannot_write_before_the_evaluation(tiny_model_dir, tmp_path, capsys):
    # The dataset does not exist either: the output is checked first, before the model loads.
    cases = [(str(tmp_path), f"--output {tmp_path} is a folder; name a file in it")]
    if os.path.isdir("/sys"):  # sysfs takes no new files, whoever asks
        cases.append(("/sys/e.json", "--output /sys/e.json cannot be written: /sys does not take new files "
                                     "(Permission denied); choose another path"))
    for output, message in cases:
        assert cli.main(["eval", "--checkpoint", str(tiny_model_dir), "--dataset", "vda_nothing/x",
                         "--output", output]) == 1
        assert capsys.readouterr().err == f"vda-jax eval: error: {message}\n"
    assert os.listdir(tmp_path) == []
