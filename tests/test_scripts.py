"""Every script in scripts/ answers --help and runs at a tiny size here (a script nothing runs rots).

Each tiny run is a child process with the bundled demo model or the tiny training config, and
checks the structure of what the script reports, not its speed.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

from vda_jax.assets import DEMO_MODEL

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
TINY_RUNS = {  # script -> the test below that runs it at a tiny size
    "benchmark.py": "test_benchmark", "benchmark_data.py": "test_benchmark_data",
    "benchmark_stream.py": "test_benchmark_stream", "benchmark_train.py": "test_benchmark_train",
    "check_demo.py": "test_check_demo", "export_check.py": "test_export_check",
    "make_sample_video.py": "test_make_sample_video", "memory_plan.py": "test_memory_plan",
    "reproduce_claim.py": "test_reproduce_claim",
}


def run_script(name: str, *args, env: dict[str, str], timeout: float = 600) -> str:
    """Runs ``scripts/name`` with ``args``; returns its stdout (asserts a zero exit)."""
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def json_values(text: str) -> list:
    """Every JSON value printed in ``text`` (one-line and indented ones), in order."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        value, i = decoder.raw_decode(text, i)
        values.append(value)
    return values


def test_every_script_has_a_tiny_run():
    assert sorted(p.name for p in SCRIPTS.glob("*.py")) == sorted(TINY_RUNS)
    assert all(callable(globals().get(test)) for test in TINY_RUNS.values())


@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_help(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_make_sample_video(tmp_path, child_env):
    from vda_jax.io.video import read_frames

    out = tmp_path / "sample.mp4"
    stdout = run_script("make_sample_video.py", "--output", out, "--frames", 6, "--height", 32, "--width", 48,
                        env=child_env(1))
    assert f"wrote {out}: 6 frames of 32x48" in stdout
    frames = np.stack(list(read_frames(str(out))))
    assert frames.shape == (6, 32, 48, 3) and frames.std() > 10  # a rendered scene, not a blank


def test_benchmark(child_env):
    stdout = run_script("benchmark.py", "--checkpoint", DEMO_MODEL, "--input-size", 56, "--height", 48,
                        "--width", 64, "--frames", 40, "--rss-frames", 40, "--repeats", 1, env=child_env(1))
    report = json_values(stdout)[-1]
    assert report["checkpoint"] == DEMO_MODEL and report["frame_size"] == [48, 64]
    assert min(report["step"]["net_size"]) == 56 and all(s % 14 == 0 for s in report["step"]["net_size"])
    assert report["step"]["step_ms_per_frame"] > 0
    video = report["video_40"]
    assert video["frames"] == 40 and video["fps"] > 0 and video["peak_rss_mb"] > 0


def test_benchmark_refuses_a_checkpoint_with_the_official(tmp_path, child_env):
    result = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--checkpoint", DEMO_MODEL, "--clip",
                             str(tmp_path / "x.mp4")], capture_output=True, text=True, env=child_env(1))
    assert result.returncode == 2 and "--checkpoint times our model alone" in result.stderr


@pytest.mark.parametrize("script, flags, problem", [
    ("benchmark.py", ["--checkpoint", "{missing}"], "does not exist"),
    ("export_check.py", ["--checkpoint", "{folder}", "--workdir", "{folder}/work"], "no config.json"),
    ("benchmark_stream.py", ["--model", "{folder}"], "no config.json"),
    ("benchmark_stream.py", ["--model", "vitx"], "unknown model 'vitx'"),
    ("benchmark.py", ["--official", "{folder}"], "--official runs in another Python: give --torch-python"),
    ("reproduce_claim.py", ["--workdir", "{folder}/claim", "--output", "{folder}"], "is a folder; name a file in it"),
])
def test_a_bad_model_is_one_line_before_any_work(script, flags, problem, tmp_path, monkeypatch, capsys):
    flags = [f.format(missing=tmp_path / "missing", folder=tmp_path) for f in flags]
    monkeypatch.setattr(sys, "argv", [script, *flags])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert exit_.value.code == 2
    assert problem in capsys.readouterr().err.splitlines()[-1]  # argparse's one error line, no traceback
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


def test_benchmark_stream(child_env):
    stdout = run_script("benchmark_stream.py", "--model", DEMO_MODEL, "--input-size", 56, "--frame-size", 48, 64,
                        "--frames", 4, "--report-every", 2, env=child_env(1))
    assert "frame      2: rss" in stdout and "frame      4: rss" in stdout
    assert "latency over 2 frames: median" in stdout and "rss after compiling" in stdout


def test_benchmark_train(child_env):
    stdout = run_script("benchmark_train.py", "--steps", 2, "train_encoder=False", "batch_size=2", "data.clip_frames=2",
                        "data.crop_size=(28,28)", env=child_env(2))
    report = json_values(stdout)[-1]
    assert report["devices"] == 2 and report["batch"] == [2, 2, 28, 28] and report["model"] == "custom"
    assert report["train_encoder"] is False and report["step_s_median"] > 0 and np.isfinite(report["final_loss"])


def test_benchmark_data(child_env):
    stdout = run_script("benchmark_data.py", "--render-sizes", 32, "--video-size", 6, 32, 40, "--clip-frames", 4,
                        "--crops", 28, "--batches", 2, "--threads", 1, env=child_env(1))
    assert "render 32x32:" in stdout and "write 24 frames of 32x40:" in stdout
    assert "pipeline 4x28x28 clips:" in stdout


def test_benchmark_data_checks_its_sizes_first(child_env):
    command = [sys.executable, str(SCRIPTS / "benchmark_data.py"), "--crops", "28", "--batches", "1", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(1))
    assert result.returncode == 2 and "one count per crop size" in result.stderr


def test_export_check(tmp_path, child_env):
    stdout = run_script("export_check.py", "--checkpoint", DEMO_MODEL, "--height", 42, "--width", 56, "--frames", 2,
                        "--repeats", 1, "--workdir", tmp_path, env=child_env(1))
    report = json_values(stdout)[-1]
    onnx, fp16 = report["onnx_fp32"], report["stablehlo_fp16"]
    # Same float32 operations in another runtime: rounding only (~1e-6 measured).
    assert onnx["finite"] and onnx["max_rel_error"] < 1e-4 and onnx["file_mb"] > 0
    assert report["jax_clip"]["max_rel_error"] < 1e-4  # all frames at once: the same depths
    assert all(report[side]["ms_per_frame"] > 0 and report[side]["peak_rss_mb"] > 0
               for side in ("jax", "jax_clip", "onnx_fp32"))
    # float16 keeps 11 bits (rounding 2^-11 per operation): a few 1e-3, measured ~3e-3.
    assert fp16["finite"] and fp16["mean_rel_error"] < 2e-2
    assert (tmp_path / "clip.onnx").is_file() and (tmp_path / "clip_fp16.stablehlo").is_file()


def test_memory_plan(child_env):
    # The GPU and TPU targets run in tests/test_aot.py (they need the [aot] extra).
    stdout = run_script("memory_plan.py", "--target", "cpu:1", "--config", "synthetic_tiny", "--only", "stream",
                        "--frame", "48x64", "--input-size", 56, "--json", env=child_env(1))
    rows = json.loads(stdout)
    assert [(r["model"], r["job"], r["precision"]) for r in rows] == [("synthetic_tiny", "stream", "fp32"),
                                                                       ("synthetic_tiny", "stream", "bf16")]
    for row in rows:
        assert row["target"] == "cpu:1" and row["devices"] == 1 and row["fits"] is None  # no memory size on CPU
        assert row["per_device_bytes"] == row["arguments_bytes"] + row["outputs_bytes"] + row["temporaries_bytes"]
        assert row["fused_attention_calls"] == 0 and not row["collectives"] and row["flops"] > 0


def test_reproduce_claim(tmp_path, child_env):
    out = tmp_path / "RESULTS.md"
    overrides = ["synthetic.num_videos=(4,2,0)", "batch_size=1", "data.clip_frames=2", "eval.every=0",
                 "optimizer.warmup_steps=0", "train_encoder=False",  # a smaller step to compile
                 "data.read_threads=1", "data.prefetch_batches=1"]
    run_script("reproduce_claim.py", "--workdir", tmp_path / "claim", "--steps", 2, "--image-steps", 1,
               "--eval-videos", 1, "--eval-frames", 33, "--output", out, *overrides, env=child_env(1))
    text = out.read_text()
    assert " ".join(overrides) in text.splitlines()[2]  # the regenerate command carries the overrides
    for row in ("(a) per-frame", "(b) spatio-temporal", "ground truth", "windows without overlap",
                "overlap alignment only", "overlap interpolation + key-frame referencing"):
        assert f"| {row}" in text
    means = json.loads((tmp_path / "claim" / "results.json").read_text())
    assert set(means) == {"per_frame", "ground_truth", "no_overlap", "overlap_alignment", "full"}
    assert all(np.isfinite(v) for scores in means.values() for v in scores.values())


def test_check_demo_names_missing_tools(tmp_path, child_env):
    result = subprocess.run([sys.executable, str(SCRIPTS / "check_demo.py"), str(tmp_path / "demo.png"),
                             "--chromium", str(tmp_path / "no-chromium")], capture_output=True, text=True,
                            env=child_env(1), timeout=120)
    assert result.returncode == 1 and not os.listdir(tmp_path)
    (line,) = result.stderr.strip().splitlines()
    assert "missing" in line and "no-chromium" in line and "apt-get install chromium chromium-driver" in line


@pytest.mark.browser
def test_check_demo(tmp_path, child_env):
    shot = tmp_path / "demo.png"
    stdout = run_script("check_demo.py", shot, "--max-len", 8, "--timeout", 300, env=child_env(1))
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert "temporary folders left: none" in stdout and "status:" in stdout

