"""`vda-jax infer` end to end on videos the test writes: outputs, batching, resume and bad input."""

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import vda_jax
from vda_jax import cli
from vda_jax.assets import DEMO_MODEL, SAMPLE_RENDER
from vda_jax.checkpoint import load_checkpoint
from vda_jax.data.synthetic import render_video
from vda_jax.eval.metrics import depth_metrics
from vda_jax.inference import files
from vda_jax.inference.video import infer_video_depth
from vda_jax.io import outputs
from vda_jax.io.video import VideoWriter, probe, read_frames


def _write_video(path, frames, fps=10):
    with VideoWriter(str(path), fps) as writer:
        writer.write(frames)


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    """The bundled demo model: here the CLI is compared with the library, not with the official outputs,
    and its 4 ViT blocks compile in a third of the fixture model's time."""
    return pathlib.Path(DEMO_MODEL)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_checkpoint(str(model_dir))


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


def test_infer_writes_every_output_and_matches_the_library(model_dir, videos, tmp_path, capsys, x264_subme):
    out = tmp_path / "out"
    args = ["infer", *map(str, videos), "--checkpoint", str(model_dir), "--output-dir", str(out),
            "--input-size", "28", "--save-npz", "--batch-size", "2", "--video-preset", "ultrafast", "--quiet"]
    assert cli.main(args) == 0
    assert sorted(os.listdir(out)) == ["clip0_depths.npz", "clip0_src.mp4", "clip0_vis.mp4",
                                       "clip1_depths.npz", "clip1_src.mp4", "clip1_vis.mp4"]
    model = load_checkpoint(str(model_dir))
    for video in videos:
        name = video.stem
        depths = np.load(out / f"{name}_depths.npz")["depths"]
        expected = infer_video_depth(model, np.stack(list(read_frames(str(video), max_res=1280))), input_size=28)
        np.testing.assert_allclose(depths, expected, rtol=1e-5, atol=1e-5 * expected.max())
        assert len(list(read_frames(str(out / f"{name}_vis.mp4")))) == len(depths)
        assert x264_subme(out / f"{name}_vis.mp4") == x264_subme(out / f"{name}_src.mp4") == 0  # ultrafast
    # A second run finds everything done and skips it.
    capsys.readouterr()
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("outputs exist, skipping") == 2
    assert captured.out.strip() == f"0 of 2 videos written to {out}; 2 done before"


def test_unreadable_video_fails_alone_odd_sizes_are_stated_stale_temporaries_go(model_dir, videos, tmp_path,
                                                                                  capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    odd = tmp_path / "odd"  # 33x47 frames: an mp4 cannot hold them, so images
    odd.mkdir()
    for i in range(5):
        Image.fromarray(np.full((33, 47, 3), 40 * i, np.uint8)).save(odd / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".clip1_outputs.0123abcd.tmp").mkdir()  # what a killed run leaves
    (out / ".clip1_outputs.0123abcd.tmp" / "clip1_src.mp4").write_bytes(b"partial")
    (out / ".odd_src.89abcdef.tmp.mp4").write_bytes(b"partial")
    (out / ".clip10_src.89abcdef.tmp.mp4").write_bytes(b"another video's")
    code = cli.main(["infer", str(bad), str(videos[1]), str(odd), "--checkpoint", str(model_dir),
                     "--output-dir", str(out), "--input-size", "28", "--save-npz", "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken.mp4" in captured.err and "Traceback" not in captured.err
    assert f"{odd}: the mp4s are padded to 48x34 (H.264 yuv420p has no odd sizes); the depth files keep 47x33" \
        in captured.err
    assert captured.out.strip() == f"2 of 3 videos written to {out}; 1 failed"
    assert sorted(os.listdir(out)) == [".clip10_src.89abcdef.tmp.mp4", "clip1_depths.npz", "clip1_src.mp4",
                                       "clip1_vis.mp4", "odd_depths.npz", "odd_src.mp4", "odd_vis.mp4"]
    assert np.load(out / "odd_depths.npz")["depths"].shape == (5, 33, 47)
    for name in ("odd_src.mp4", "odd_vis.mp4"):
        info = probe(str(out / name))
        assert (info.num_frames, info.height, info.width) == (5, 34, 48)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vda-jax infer: error:") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(model_dir, videos, tmp_path, capsys, monkeypatch):
    assert cli.main(["infer", str(tmp_path / "missing.mp4"), "--checkpoint", str(tmp_path)]) == 1
    assert "missing.mp4" in _error(capsys)
    for bad in (["--batch-size", "0"], ["--video-preset", "quick"]):
        with pytest.raises(SystemExit):
            cli.main(["infer", "x.mp4", *bad])
    capsys.readouterr()
    video = str(videos[1])
    assert cli.main(["infer", video, "--checkpoint", str(tmp_path / "nowhere")]) == 1
    assert "--checkpoint" in (err := _error(capsys)) and "nowhere' does not exist" in err
    (tmp_path / "a_file").write_text("")
    assert cli.main(["infer", video, "--output-dir", str(tmp_path / "a_file")]) == 1
    assert "a_file' is a file; name a folder" in _error(capsys)
    # Checked before the model loads (the checkpoint is missing too), with the README's install command.
    monkeypatch.setattr(outputs, "exr_available", lambda: False)
    out = tmp_path / "out"
    assert cli.main(["infer", video, "--save-exr", "--checkpoint", str(tmp_path / "nowhere"),
                     "--output-dir", str(out)]) == 1
    assert _error(capsys).endswith('--save-exr needs the OpenEXR package: pip install -e ".[exr]"')
    assert 'pip install -e ".[exr]"' in (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    # A run that writes nothing leaves no output folder behind.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"")
    assert cli.main(["infer", str(broken), "--checkpoint", str(model_dir), "--output-dir", str(out),
                     "--quiet"]) == 1
    assert not out.exists()


def test_option_values_are_checked_and_help_shows_defaults(capsys, tmp_path):
    for flags, message in [(["--max-len", "0"], "--max-len: must be a positive integer or -1 (off), got 0"),
                           (["--max-len", "-5"], "--max-len: must be a positive integer or -1 (off), got -5"),
                           (["--max-res", "0"], "--max-res: must be a positive integer or -1 (off), got 0"),
                           (["--target-fps", "0"], "--target-fps: must be a positive number or -1 (off), got 0"),
                           (["--focal-length-x", "-1"], "--focal-length-x: must be a positive number, got -1"),
                           (["--batch-size", "two"], "--batch-size: must be a positive integer, got two"),
                           (["--input-size", "13"], "--input-size: must be an integer >= 14 (one ViT patch), got 13"),
                           (["--frames-per-second"], None)]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["infer", "--sample", *flags])
        assert exit_info.value.code == 2
        # An option no command takes is named by the command whose --help lists what it takes.
        problem = f"argument {message}" if message else f"unrecognized arguments: {' '.join(flags)}"
        assert capsys.readouterr().err == f"vda-jax infer: error: {problem} (see vda-jax infer --help)\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["infer", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "--max-res MAX_RES downscale frames whose long side exceeds this (-1: never) (default: 1280)" in shown
    assert "videos of one frame size processed together (sharded over this process's devices) (default: 1)" in shown
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"vda-jax {vda_jax.__version__}\n"
    # Streaming takes one video at a time: a batch size is refused, not ignored.
    assert cli.main(["infer", "--sample", "--streaming", "--batch-size", "2", "--output-dir",
                     str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == ("vda-jax infer: error: --batch-size 2: streaming runs one video at a time; "
                                       "drop --batch-size\n")
    assert not (tmp_path / "out").exists()
    # Output folders that cannot be made, said before the model loads.
    (tmp_path / "a_file").write_text("")
    cases = [(tmp_path / "a_file" / "out", f"--output-dir {tmp_path / 'a_file' / 'out'} cannot be a folder: "
                                           f"{tmp_path / 'a_file'} is a file; choose another path")]
    if os.path.isdir("/sys"):  # sysfs takes no new files, whoever asks
        cases.append(("/sys/out", "--output-dir /sys/out cannot be written: /sys does not take new files (Permission "
                                  "denied); choose another path"))
    for out, message in cases:
        assert cli.main(["infer", "--sample", "--checkpoint", str(tmp_path / "nowhere"), "--output-dir", str(out)]) == 1
        assert capsys.readouterr().err == f"vda-jax infer: error: {message}\n"


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


def _processes_naming(text: str) -> list[str]:
    """Command lines of running processes that mention ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if text in cmdline:
                found.append(cmdline)
    return found


@pytest.mark.parametrize("signum, message", [(signal.SIGINT, "vda-jax: interrupted"),
                                             (signal.SIGTERM, "vda-jax: stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_exits_128_plus_signal_and_leaves_nothing(model_dir, tmp_path, signum, message,
                                                                    child_env):
    """A stop signal while the first window compiles, with the decoder and the encoder running (SIGTERM, as
    `timeout` or a cluster sends it, to the main process alone)."""
    video = tmp_path / "long.mp4"
    y, x = np.mgrid[:40, :56]
    _write_video(video, np.stack([np.uint8(128 + 100 * np.sin((x + 2 * t) / 6 + y / 9))[..., None].repeat(3, -1)
                                  for t in range(200)]))
    out = tmp_path / "out"
    env = child_env(1, VDA_JAX_CACHE_DIR=str(tmp_path / "cache"))  # an empty cache: the window compiles
    process = subprocess.Popen([sys.executable, "-m", "vda_jax.cli", "infer", str(video), "--checkpoint",
                                str(model_dir), "--output-dir", str(out), "--input-size", "28", "--save-npz",
                                "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and os.listdir(out)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [n.startswith(".long_outputs.") for n in os.listdir(out)] == [True]  # staging: video under way
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == message and "Traceback" not in err
    assert not out.exists(), os.listdir(out)  # no temporary, no partial output, not the folder this run made
    assert _processes_naming(str(tmp_path)) == []  # no ffmpeg left decoding or encoding


def _finish_clip0_with(monkeypatch, action):
    """Makes clip0's outputs run ``action()`` before they are finished (encoded and moved into place)."""
    finish = files.VideoOutputs.finish

    def patched(sink):
        if "clip0" in sink.paths["src"]:
            action()
        finish(sink)

    monkeypatch.setattr(files.VideoOutputs, "finish", patched)


def _infer(model, videos, out, **kwargs):
    return files.infer_files(model, [str(v) for v in videos], files.OutputOptions(str(out), save_npz=True),
                             files.ReadOptions(), input_size=28, progress=False, **kwargs)


def test_a_video_is_finished_while_the_next_one_runs(model, videos, tmp_path, monkeypatch):
    second_written = threading.Event()
    write = files.VideoOutputs.write

    def noting_write(sink, depth):
        if "clip1" in sink.paths["src"]:
            second_written.set()
        write(sink, depth)

    monkeypatch.setattr(files.VideoOutputs, "write", noting_write)
    overlapped = []
    _finish_clip0_with(monkeypatch, lambda: overlapped.append(second_written.wait(timeout=60)))
    report = _infer(model, videos, tmp_path)
    assert overlapped == [True]  # clip1's depths came while clip0 waited to be finished
    assert sorted(report.written) == sorted(map(str, videos)) and not report.failed
    assert sorted(os.listdir(tmp_path)) == sorted(f"clip{i}_{kind}" for i in range(2)
                                                  for kind in ("depths.npz", "src.mp4", "vis.mp4"))


def _full_disk():
    raise OSError(28, "No space left on device")


def test_a_video_that_fails_to_finish_fails_alone(model, videos, tmp_path, monkeypatch):
    _finish_clip0_with(monkeypatch, _full_disk)
    logged = []
    report = _infer(model, videos, tmp_path, log=logged.append)
    assert report.failed == [str(videos[0])] and report.written == [str(videos[1])]
    assert logged == [f"{videos[0]}: error: [Errno 28] No space left on device"]
    assert sorted(os.listdir(tmp_path)) == ["clip1_depths.npz", "clip1_src.mp4", "clip1_vis.mp4"]


def test_a_message_starts_a_line_of_its_own_under_the_progress_bar(model, videos, tmp_path, monkeypatch, capsys):
    _finish_clip0_with(monkeypatch, _full_disk)
    files.infer_files(model, [str(v) for v in videos], files.OutputOptions(str(tmp_path), save_npz=True),
                      files.ReadOptions(), input_size=28, progress=True)
    err = capsys.readouterr().err
    assert "depth:" in err  # the bar was drawn
    (line,) = [part for part in re.split(r"[\r\n]", err) if "error:" in part]
    assert line == f"{videos[0]}: error: [Errno 28] No space left on device"


def test_ctrl_c_while_a_video_is_finished_in_the_background(model, videos, tmp_path, monkeypatch):
    def interrupt_then_wait():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.5)  # the interrupt reaches the main thread while this video is being finished

    _finish_clip0_with(monkeypatch, interrupt_then_wait)
    with pytest.raises(KeyboardInterrupt):
        _infer(model, videos, tmp_path)
    # The video being finished completes; the other leaves nothing, and no temporary is left.
    assert sorted(os.listdir(tmp_path)) == ["clip0_depths.npz", "clip0_src.mp4", "clip0_vis.mp4"]
    assert len(np.load(tmp_path / "clip0_depths.npz")["depths"]) == 30


def test_ctrl_c_while_outputs_move_waits_for_all_of_them(tmp_path, monkeypatch):
    options = files.OutputOptions(str(tmp_path), save_npz=True)
    paths = files.output_paths("clip.mp4", options)
    sink = files.VideoOutputs("clip", paths, 10, options)
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    list(sink.tee(frame for frame in frames))
    sink.write(np.ones((3, 16, 16), np.float32))
    replace = os.replace

    def interrupted_replace(source, target):
        replace(source, target)
        if os.path.dirname(target) == str(tmp_path):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once an output is in place

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        sink.close()
    assert sorted(os.listdir(tmp_path)) == ["clip_depths.npz", "clip_src.mp4", "clip_vis.mp4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(args: list[str], child_env) -> list[tuple[int, str, str]]:
    """Runs `vda-jax ARGS` as 2 processes (a coordinator on 127.0.0.1, 2 CPU devices each); (code, out, err) each."""
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "vda_jax.cli", *args],
        env=child_env(2, JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in processes]
        return [(p.returncode, out, err) for p, (out, err) in zip(processes, results)]
    finally:
        for p in processes:
            p.kill()


def test_two_processes_split_the_videos(model_dir, tmp_path, child_env):
    """Every output once, equal to a 1-process run's; a re-run skips them, and a failure on one process
    does not hold up the other."""
    inputs = tmp_path / "videos"
    inputs.mkdir()
    y, x = np.mgrid[:32, :48]
    for i, n in enumerate([10, 8, 12, 8]):
        _write_video(inputs / f"v{i}.mp4", np.stack([np.uint8(128 + 100 * np.sin((x + 3 * t + 7 * i) / 6 + y / 9))
                                                     [..., None].repeat(3, -1) for t in range(n)]))
    out, single = tmp_path / "out", tmp_path / "single"
    args = ["infer", "--checkpoint", str(model_dir), "--input-size", "28", "--save-npz", "--quiet"]
    assert cli.main([*args, str(inputs), "--output-dir", str(single)]) == 0
    runs = _run_two_processes([*args, str(inputs), "--output-dir", str(out)], child_env)
    for i, (code, stdout, stderr) in enumerate(runs):
        assert code == 0, stderr
        assert stdout.strip() == f"process {i} of 2: 2 of 2 videos written to {out}", stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(single)) and len(os.listdir(out)) == 12
    for i in range(4):  # to float rounding: XLA:CPU's kernels split their sums by the process's devices
        expected = np.load(single / f"v{i}_depths.npz")["depths"]
        np.testing.assert_allclose(np.load(out / f"v{i}_depths.npz")["depths"], expected,
                                   rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    broken = tmp_path / "broken.mp4"  # sorts first: process 0's
    broken.write_bytes(b"")
    (code0, stdout0, _), (code1, stdout1, stderr1) = _run_two_processes(
        [*args, str(inputs), str(broken), "--output-dir", str(out)], child_env)
    assert (code0, stdout0.strip()) == (1, f"process 0 of 2: 0 of 3 videos written to {out}; 2 done before; 1 failed")
    assert (code1, stdout1.strip()) == (0, f"process 1 of 2: 0 of 2 videos written to {out}; 2 done before"), stderr1
