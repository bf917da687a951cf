"""The train / convert / eval / pseudo-label side of the command line under a user's hands (issue 13)."""

import gc
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from vda_jax.convert.keymap import KeyMismatchError, plan_conversion
from vda_jax.convert.readers import read_checkpoint

from vda_jax import cli
from vda_jax.checkpoint import check_model_output, flat_shapes, load_checkpoint
from vda_jax.inference.window import WINDOW_FRAMES
from vda_jax.models.vda import VideoDepthAnything
from vda_jax.train.config import load_config, model_config_from, resume_changes


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


def test_an_interrupt_python_drops_is_raised_again_without_a_traceback(capsys):
    # Ctrl-C inside a gc callback (JAX has one) is dropped by Python: "Exception ignored in ...".
    fired, seen = [], []

    def callback(phase, info):
        if not fired:
            fired.append(phase)
            signal.raise_signal(signal.SIGINT)  # the handler raises inside the callback

    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with cli._interrupts() as (interrupted, raise_from_now):
            raise_from_now()
            gc.callbacks.append(callback)
            try:
                with pytest.raises(KeyboardInterrupt):
                    gc.collect()
                    time.sleep(5)  # the interrupt comes again (a sleep ends at a signal)
            finally:
                gc.callbacks.remove(callback)
            try:  # other errors still reach the hook that was there
                raise ValueError("other")
            except ValueError as e:
                sys.unraisablehook(type("Info", (), {"exc_value": e})())
        assert sys.unraisablehook == seen.append  # restored
    finally:
        sys.unraisablehook = previous
    assert fired == ["start"] and [type(info.exc_value) for info in seen] == [ValueError]
    assert interrupted() and capsys.readouterr().err == ""


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
    # An empty directory may be replaced, and a model directory (here an old, stale one) is.
    (tmp_path / "empty").mkdir()
    check_model_output(str(tmp_path / "empty"), overwrite=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"format": "vda-jax", "version": 1}')
    assert cli.main([*args, str(tmp_path / "model")]) == 0
    load_checkpoint(str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "model", "notes"]


def test_pseudo_label_checks_its_folders_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda checkpoint: pytest.fail("the model loaded first"))
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    for images, output, message in [
            ("notes.txt", "labels", f"images folder {tmp_path / 'notes.txt'} is a file; give the folder of the images"),
            ("missing", "labels", f"images folder {tmp_path / 'missing'} does not exist"),
            ("images", "notes.txt/labels", f"--output {tmp_path / 'notes.txt/labels'} cannot be a folder: "
                                           f"{tmp_path / 'notes.txt'} is a file; choose another path"),
            ("images", "images/labels", f"--output {tmp_path / 'images/labels'} is inside the images folder "
                                        f"{tmp_path / 'images'} (its labels would be read as images); give a "
                                        "folder outside it")]:
        assert cli.main(["pseudo-label", str(tmp_path / images), "--output", str(tmp_path / output)]) == 1
        assert capsys.readouterr().err == f"vda-jax pseudo-label: error: {message}\n"
    assert sorted(os.listdir(tmp_path)) == ["images", "notes.txt"]


def test_pseudo_label_labels_the_readable_images_and_names_the_others(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path.parent / f"{tmp_path.name}-labels"
    args = ["pseudo-label", str(tmp_path), "--output", str(out), "--checkpoint", str(tiny_model_dir),
            "--input-size", "28", "--batch-size", "2", "--quiet"]  # the shapes of test_pseudo_label
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vda-jax pseudo-label: error: labelled 2 image(s), but 1 could not be read: ")
    assert "broken.png" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(out / "depth")) == ["a.npy", "b.npy"]


@pytest.mark.parametrize("name", ["synthetic_tiny", "synthetic_claim", "paper:vits", "paper:vitl"])
def test_shipped_configs_load_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_config_from(load_config(name).model).num_frames >= WINDOW_FRAMES  # validated on loading


def test_the_tiny_config_trains_a_model_that_runs_the_inference_window():
    config = load_config("synthetic_tiny")
    model = nnx.eval_shape(lambda: VideoDepthAnything(model_config_from(config.model), rngs=nnx.Rngs(0)))
    window = jax.ShapeDtypeStruct((1, WINDOW_FRAMES, 28, 28, 3), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), model, window).shape == (1, WINDOW_FRAMES, 28, 28)


def test_train_config_errors_come_first_and_in_one_line(tmp_path, capsys, fixtures):
    def train(*args):
        code = cli.main(["train", "--workdir", str(tmp_path / "run"), *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "Downloading" not in out + err and len(err.splitlines()) == 1, err
        return code, err

    (tmp_path / "some.json").write_text("{}")
    assert train("--config", str(tmp_path / "some.json")) == (1, f"vda-jax train: error: config file "
                                                                  f"{tmp_path / 'some.json'} is not a Python file; "
                                                                  "a config is a .py file defining get_config() "
                                                                  "(see configs/train/)\n")
    code, err = train("--config", "no_such_config")
    assert code == 1 and "shipped config: paper, synthetic_claim, synthetic_tiny" in err
    # Values are checked before any data is written.
    for override, message in [("total_steps=10", "optimizer.warmup_steps 20 must be in [0, total_steps 10); "
                                                  "shorten the warm-up too, e.g. optimizer.warmup_steps=1"),
                              ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1.0"),
                              ("optimizer.b2=1.5", "optimizer.b2 must be in [0, 1), got 1.5"),
                              ("log_every=0", "log_every must be >= 1, got 0"),
                              ("batch_size=64", "the synthetic 'validation' split (evaluation) would hold 40 clips "
                                                "of 8 frames, fewer than one batch of 64; render more videos "
                                                "(synthetic.num_videos, per train/validation/test split) or lower "
                                                "batch_size, or evaluate never (eval.every=0)"),
                              ("synthetic.name='other'", "synthetic.name 'other' and data.video_dataset "
                                                         "'vda_synthetic/tiny' disagree"),
                              ("model.num_frames=8", "model.num_frames 8 is below the 32-frame inference window"),
                              ("data.clip_frames=40", "data.clip_frames 40 exceeds model.num_frames 32"),
                              ("data.crop_size=(50,50)", "crop_size must be two positive multiples of 14"),
                              ("data.flip_prob=2.0", "flip_prob must be in [0, 1], got 2.0"),
                              ("data.read_threads=0", "read_threads must be >= 1, got 0"),
                              ("frames_per_chunk=-1", "frames_per_chunk must be >= 0"),
                              ("precision=fp16", "unknown precision 'fp16'"),
                              ("checkpoint.best_mode='low'", "checkpoint.best_mode must be 'min' or 'max'"),
                              ("checkpoint.best_metric='val_sharpness'", "checkpoint.best_metric must be one of "
                                                                         "['val_loss', 'val_spatial', 'val_stable', "
                                                                         "'val_abs_rel', 'val_delta1']"),
                              ("synthetic.scene_kind='forest'", "synthetic.scene_kind must be one of ['room', "
                                                                "'outdoor'] or None (a mix), got 'forest'"),
                              # A field declared with a type and no value, and a tuple's items.
                              ("optimizer.temporal_lr=abc", "config key 'optimizer.temporal_lr' holds float "
                                                            "values; cannot set it to 'abc'"),
                              ('data.crop_size=("a","b")', "config key 'data.crop_size' holds tuple of int values "
                                                           "(now (56, 56)); cannot set it to '(\"a\",\"b\")'")]:
        code, err = train("--config", "synthetic_tiny", override)
        assert code == 1 and message in err, (override, err)
    # init_from, before the dataset is rendered: missing, a training workdir, another architecture.
    workdir = tmp_path / "other_run"
    workdir.mkdir()
    (workdir / "config.json").write_text(load_config("synthetic_tiny").to_json())
    for init_from, message in [
            ("/nonexistent", "init_from '/nonexistent' does not exist; give a vda-jax model directory, an official "
                             ".pth / .safetensors file or the name of one (vits, vitb, vitl, metric-vits, "),
            (workdir, f"{workdir} is a training workdir, not a model directory; its model is written when training "
                      f"ends, or now by `vda-jax checkpoint-to-model {workdir} OUT`"),
            (tmp_path / "some.json", f"{tmp_path / 'some.json'}: not a checkpoint (expected a PyTorch .pth zip "
                                     "archive or a safetensors file)")]:
        code, err = train("--config", "synthetic_tiny", f"init_from='{init_from}'")
        assert code == 1 and err.startswith(f"vda-jax train: error: {message}") and err.count("\n") == 1, err
    # A checkpoint of another architecture is matched before the data is rendered ("Downloading": train()).
    code, err = train("--config", "synthetic_tiny", f"init_from='{fixtures / 'tiny.pth'}'")
    assert code == 1 and err.startswith("vda-jax train: error: checkpoint does not match the model architecture; ")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    for workdir in ("file", "file/run"):
        code, err = train("--config", "synthetic_tiny", "--workdir", str(tmp_path / workdir))
        assert code == 1 and f"{tmp_path / 'file'} is a file" in err, err


def test_resuming_says_what_changed_and_refuses_incompatible_changes(tmp_path, capsys):
    started = load_config("synthetic_tiny").to_json(indent=2)  # as the run's config.json
    resumed = load_config("synthetic_tiny", ["optimizer.lr=3e-4", "total_steps=400", "data.crop_size=(28,28)"])
    assert resume_changes(started, resumed) == [
        "data.crop_size: [56, 56] -> [28, 28]", "optimizer.lr: 0.001 -> 0.0003", "total_steps: 300 -> 400"]
    assert resume_changes(started, load_config("synthetic_tiny")) == []
    # From the command line: refused before anything is built.
    (tmp_path / "config.json").write_text(started)
    args = ["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)]
    assert cli.main([*args, "batch_size=8", "model.features=64", "optimizer.lr=3e-4"]) == 1
    err = capsys.readouterr().err
    assert err == ("vda-jax train: error: the run in this workdir cannot resume with batch_size: 4 -> 8; "
                   "model.features: 32 -> 64: these settings are fixed once a run starts; restore them or use a "
                   "new --workdir\n")
    assert os.listdir(tmp_path) == ["config.json"]


def test_convert_names_missing_tensors_by_their_official_names(fixtures, tiny_model):
    shapes = {k: v.shape for k, v in read_checkpoint(fixtures / "tiny.pth").items()}  # the official layout
    targets = flat_shapes(nnx.state(tiny_model))
    gone = ["pretrained.blocks.0.norm1.weight", "head.scratch.refinenet1.resConfUnit2.conv1.bias",
            "head.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"]
    with pytest.raises(KeyMismatchError, match=r"3 missing: (\S+, ){2}\S+\. Check") as info:
        plan_conversion({k: v for k, v in shapes.items() if k not in gone}, targets)
    assert sorted(str(info.value).partition("3 missing: ")[2].removesuffix(". Check --encoder / --config.")
                  .split(", ")) == sorted(gone)
    # A Depth Anything V2 checkpoint names its head depth_head.
    image = {k.replace("head.", "depth_head.", 1): v for k, v in shapes.items() if "motion_modules" not in k}
    del image["depth_head.scratch.output_conv2.2.weight"]
    with pytest.raises(KeyMismatchError, match=r"1 missing: depth_head\.scratch\.output_conv2\.2\.weight\. Check"):
        plan_conversion(image, targets, allow_unfilled=("head.temporal.",))


def test_a_workdir_given_for_a_model_directory_and_back(tmp_path, tiny_model_dir, capsys):
    """Each names what it got and where to find what it needs (#24.8)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(load_config("synthetic_tiny").to_json())
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.png")
    hint = (f"{run} is a training workdir, not a model directory; its model is written when training ends, or now "
            f"by `vda-jax checkpoint-to-model {run} OUT`")
    for command in (["infer", "--sample", "--checkpoint", str(run), "--output-dir", str(tmp_path / "out")],
                    ["eval", "--checkpoint", str(run), "--dataset", "vda_synthetic/tiny"],
                    ["export", str(run), str(tmp_path / "m.onnx")],
                    ["pseudo-label", str(images), "--output", str(tmp_path / "labels"), "--checkpoint", str(run)],
                    ["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path / "new"), f"init_from={run}"]):
        assert cli.main(command) == 1
        assert capsys.readouterr().err == f"vda-jax {command[0]}: error: {hint}\n"
    os.symlink(tiny_model_dir, run / "model")  # the run has finished
    assert cli.main(["export", str(run), str(tmp_path / "m.onnx")]) == 1
    assert capsys.readouterr().err == (f"vda-jax export: error: {run} is a training workdir, not a model directory; "
                                       f"give {run / 'model'}\n")
    # And back: a model directory where a workdir goes.
    assert cli.main(["checkpoint-to-model", str(tiny_model_dir), str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err == (f"vda-jax checkpoint-to-model: error: {tiny_model_dir} is a model directory "
                                       f"already; use it as it is (e.g. --checkpoint {tiny_model_dir})\n")
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tiny_model_dir)]) == 1
    assert capsys.readouterr().err == (f"vda-jax train: error: --workdir {tiny_model_dir} is a model directory, not a "
                                       f"training workdir; choose a new --workdir (to start from this model: "
                                       f"init_from={tiny_model_dir})\n")
    assert sorted(os.listdir(tmp_path)) == ["images", "run"]
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "model"]


def test_checkpoint_to_model_before_any_checkpoint_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(load_config("synthetic_tiny").to_json())
    assert cli.main(["checkpoint-to-model", str(run), str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err == f"vda-jax checkpoint-to-model: error: {run} has no checkpoint yet\n"
    assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == ["config.json"]  # no checkpoints/ made in it
