"""The train / convert / eval / pseudo-label side of the command line under a user's hands (issue 13)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from vda_jax import cli
from vda_jax.checkpoint import load_checkpoint


def test_ctrl_c_during_convert_exits_130_and_leaves_all_or_nothing(tmp_path, fixtures):
    # Interrupts while starting, converting and writing; tries run side by side to keep it short.
    command = [sys.executable, "-m", "vda_jax.cli", "convert", str(fixtures / "tiny.pth"), "--config",
               str(fixtures / "tiny_architecture.json")]
    delays = (0.5, 1.2, 2.0)  # after the interpreter's own start-up, which nothing here can make interruptible
    runs = []
    for i, delay in enumerate(delays):
        process = subprocess.Popen([*command, str(tmp_path / f"m{i}")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        runs.append((time.monotonic() + delay, process))
    signalled = []
    for when, process in runs:
        time.sleep(max(0.0, when - time.monotonic()))
        signalled.append(process.poll() is None)
        process.send_signal(signal.SIGINT)
    assert sum(signalled) >= 2, "the conversions finished before the interrupts; raise the delays"
    for i, (_, process) in enumerate(runs):
        _, err = process.communicate(timeout=120)
        if signalled[i]:
            assert process.returncode == 130, err
            assert err.strip().endswith("vda-jax: interrupted") and "Traceback" not in err, err
        if (tmp_path / f"m{i}").exists():  # the interrupt came too late to stop it: a whole model
            load_checkpoint(str(tmp_path / f"m{i}"))
    assert all(not name.startswith(".") for name in os.listdir(tmp_path))  # no temporary left


def test_convert_overwrite_replaces_only_model_directories(tmp_path, fixtures, capsys):
    args = ["convert", str(fixtures / "tiny.pth"), "--config", str(fixtures / "tiny_architecture.json"), "--overwrite"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    assert cli.main([*args, str(notes)]) == 1
    assert "is not a vda-jax model directory" in capsys.readouterr().err
    assert (notes / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    assert cli.main([*args, str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    # A model directory, or an empty one, is replaced.
    (tmp_path / "empty").mkdir()
    assert cli.main([*args, str(tmp_path / "empty")]) == 0
    assert cli.main([*args, str(tmp_path / "empty")]) == 0
    load_checkpoint(str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "notes"]


def test_pseudo_label_labels_the_readable_images_and_names_the_others(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path.parent / f"{tmp_path.name}-labels"
    args = ["pseudo-label", str(tmp_path), "--output", str(out), "--checkpoint", str(tiny_model_dir),
            "--input-size", "28", "--quiet"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vda-jax pseudo-label: error: labelled 2 image(s), but 1 could not be read: ")
    assert "broken.png" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(out / "depth")) == ["a.npy", "b.npy"]
