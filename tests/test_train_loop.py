"""The training loop: resume, Ctrl-C, non-finite loss, evaluation, export, config overrides, CLI."""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import config_dict

from vda_jax import cli
from vda_jax.assets import DEMO_MODEL
from vda_jax.checkpoint import load_checkpoint, read_config
from vda_jax.data import builders
from vda_jax.train.checkpoints import Checkpoints, flat_arrays, with_arrays
from vda_jax.train.config import apply_overrides, default_config, load_config
from vda_jax.train.coordination import Interrupted
from vda_jax.train.init import initial_model
from vda_jax.train.loop import NonFiniteLossError, Trainer

TINY_CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "train" / "synthetic_tiny.py"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The tiny config on a 2x2x2 mesh: 4 clips x 4 frames x 28x42, the bundled demo model (4 ViT blocks:
    a third of the fixture model's compile), 6 steps."""
    config = load_config(str(TINY_CONFIG), [
        f"data.data_dir={tmp_path_factory.mktemp('data')}", "synthetic.height=32", "synthetic.width=48",
        "synthetic.num_frames=8", "synthetic.num_videos=(4,2,0)", "data.clip_frames=4", "data.clip_hop=2",
        "data.crop_size=(28,42)", "batch_size=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
        "sharding.min_fsdp_size=0", "train_encoder=False", f"init_from={DEMO_MODEL}", "total_steps=6",
        "optimizer.warmup_steps=2", "checkpoint.every=2", "eval.every=6", "eval.max_batches=1", "log_every=1",
        "progress_bar=False"])
    model, _ = read_config(DEMO_MODEL)
    config.model = config_dict.ConfigDict({"name": "custom", **{k: v for k, v in model.to_dict().items()
                                                                if k != "encoder"}})
    return config


def records(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_resume_interrupt_nonfinite_and_export(config, tmp_path):
    # Uninterrupted: 4 steps, checkpoints at 2 and 4.
    first = Trainer(config, str(tmp_path / "a"))
    first.run(until=4)
    at_4 = jax.device_get(flat_arrays(first.state))

    # A process killed during step 4 leaves checkpoint 2 and a log that runs past it; a new
    # trainer resumes from step 2, drops the stale log lines and sees the same batches.
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        stale = [line for line in f if json.loads(line)["step"] <= 3]
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(stale) + '{"step": 4, "lo')  # cut short
    second = Trainer(config, str(tmp_path / "b"))
    assert second.step == 2
    second.run(until=4)
    resumed = jax.device_get(flat_arrays(second.state))
    assert resumed.keys() == at_4.keys()
    for k in at_4:
        np.testing.assert_array_equal(resumed[k], at_4[k], err_msg=k)
    assert records(tmp_path / "b") == records(tmp_path / "a")

    # Ctrl-C at step 5 (sent as it is logged): the run checkpoints step 5 and stops.
    write = second.log.write

    def write_then_interrupt(record):
        write(record)
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    second.log.write = write_then_interrupt
    with pytest.raises(Interrupted, match="SIGINT at step 5"):
        second.run()
    second.log.write = write
    assert second.step == 5 and second.checkpoints.latest_step() == 5

    # A diverged model stops the run at its next step without saving.
    arrays = flat_arrays(second.state)
    key = "model.head.output_conv3.bias"
    poisoned = jax.device_put(jnp.full_like(arrays[key], jnp.nan), arrays[key].sharding)
    second.state = with_arrays(second.state, {**arrays, key: poisoned})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 6 .*last good checkpoint is step 5") as e:
        second.run()
    assert "\n" not in str(e.value)
    assert second.checkpoints.latest_step() == 5
    second.close()

    # Finishing evaluates (metric depth: AbsRel and delta1) and exports the final model.
    first.run()
    first.close()
    evaluation = records(tmp_path / "a", "val_abs_rel")
    assert list(evaluation) == [6] and 0 < evaluation[6] < 10
    assert 0 <= records(tmp_path / "a", "val_delta1")[6] <= 1
    exported = jax.device_get(flat_arrays(nnx.state(load_checkpoint(str(tmp_path / "a" / "model")))))
    final = jax.device_get(flat_arrays(first.state))
    for k, v in exported.items():
        np.testing.assert_array_equal(v, final[f"model.{k}"], err_msg=k)

    # The checkpoint restores onto another mesh: fsdp over all 8 devices.
    resharded = config.copy_and_resolve_references()
    apply_overrides(resharded, ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"])
    third = Trainer(resharded, str(tmp_path / "a"))
    third.close()
    assert third.step == 6
    kernel = flat_arrays(third.state)["model.head.refinenets.0.res_unit1.conv1.kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
    for k, v in jax.device_get(flat_arrays(third.state)).items():
        np.testing.assert_array_equal(v, final[k], err_msg=k)


def test_a_validation_split_smaller_than_a_batch_is_refused_before_training(config, tmp_path):
    """With prepared data (no synthetic config to count the clips from), when the trainer is built (#24.6)."""
    prepared = config.copy_and_resolve_references()
    fields = prepared.synthetic.to_dict()
    builders.prepare(builders.VdaSynthetic, prepared.data.data_dir,
                     config=builders.SyntheticConfig(name=fields.pop("name"), **fields))  # (once per module)
    apply_overrides(prepared, ["batch_size=8"])  # 12 training clips, 6 validation clips
    prepared.synthetic = None
    with pytest.raises(ValueError, match=r"^vda_synthetic/tiny:validation has 6 clips of 4 frames \(stride 1\), "
                                         r"fewer than one batch of 8"):
        Trainer(prepared, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_checkpoints_keep_latest_and_best(tmp_path, caplog):
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(3.0))

    state, data = nnx.state(Tiny()), iter(grain.MapDataset.range(10).to_iter_dataset())
    val_loss = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: 7.0, 7: None}
    for steps in ((1, 2, 3, 4, 5), (6, 7)):  # a restart in between: the metrics are on disk
        checkpoints = Checkpoints(str(tmp_path), keep=2, best_metric="val_loss", best_mode="min")
        for step in steps:
            next(data)
            metrics = None if val_loss[step] is None else {"val_loss": val_loss[step]}
            checkpoints.save(step, state, data, metrics)
            checkpoints.wait()
        checkpoints.close()
    assert sorted(int(p) for p in os.listdir(tmp_path)) == [2, 6, 7]
    next(data)
    restored = Checkpoints(str(tmp_path), keep=2, best_metric="val_loss", best_mode="min").restore(2, state, data)
    np.testing.assert_array_equal(restored["w"].get_value(), np.arange(3.0))
    assert next(data) == 2  # the iterator is back where it was at step 2
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]  # steps 4 and 7: no metrics


def test_the_data_libraries_notes_are_dropped(caplog):
    """TFDS's OpenCV advice and custom-config notes (printed by every synthetic training run) and its warning of a
    data folder without the dataset (which the error then says) are not shown."""
    from absl import logging as absl_logging

    with caplog.at_level(logging.INFO):
        for message in ("OpenCV is not installed. We recommend using OpenCV because it is faster ...",
                        "Using custom data configuration: SyntheticConfig(name='tiny')",
                        "Variant folder /data/vda_synthetic/tiny/1.0.0 has no dataset_info.json",
                        "a warning of substance"):
            absl_logging.warning(message)
    assert [r.getMessage() for r in caplog.records] == ["a warning of substance"]


def test_initial_model_from_official_checkpoint(fixtures, tiny_model, tiny_model_dir):
    expected = tiny_model
    model = initial_model(expected.config, str(fixtures / "tiny.pth"), seed=0, dtype=jnp.bfloat16)
    assert model.head.projects[0].dtype == jnp.bfloat16
    got, want = (jax.device_get(flat_arrays(nnx.state(m))) for m in (model, expected))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match=r"holds a .* but the config trains"):
        initial_model(dataclasses.replace(expected.config, num_frames=16), str(tiny_model_dir), seed=0,
                      dtype=jnp.float32)


def test_overrides_parse_and_check_types():
    config = default_config()
    config.lock()
    apply_overrides(config, ["optimizer.lr=1", "data.crop_size=(56, 84)", "data.image_dataset=vda_pseudo_labels/x",
                             "remat=True", "train_encoder=True", "optimizer.temporal_lr=3e-4",
                             "checkpoint.best_metric='val_loss'", "init_from=\"/models/a b\""])
    assert config.checkpoint.best_metric == "val_loss" and config.init_from == "/models/a b"  # quotes are Python's
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.data.crop_size == (56, 84)
    assert config.data.image_dataset == "vda_pseudo_labels/x" and config.remat is True
    assert config.train_encoder is True and config.optimizer.temporal_lr == 3e-4


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1e-4", "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
    ("batch_size=abc", "config key 'batch_size' holds int values (now 4); cannot set it to 'abc'"),
    ("batch_size=1.5", "config key 'batch_size' holds int values (now 4); cannot set it to '1.5'"),
    ("train_encoder=1", "config key 'train_encoder' holds bool values (now True); cannot set it to '1'"),
    ("loss=3", "config key 'loss' is a group; set its fields as loss.FIELD=VALUE "
               "(fields: alpha, clip_groups, scales, stable_scale, trim)"),
    ("lr", "override 'lr' must look like key=value, e.g. optimizer.lr=1e-4"),
    ("dtype=bfloat16", 'config key \'dtype\' is now \'precision\' (values: "fp32", "tf32", "bf16")'),
])
def test_cli_override_errors_are_one_line(override, message, tmp_path, capsys):
    argv = ["train", "--config", str(TINY_CONFIG), "--workdir", str(tmp_path), override]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == f"vda-jax train: error: {message}\n"
    assert not os.listdir(tmp_path)  # nothing started
