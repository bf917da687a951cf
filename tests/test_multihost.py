"""Multi-process training with real processes: jax.distributed on 127.0.0.1, CPU collectives over gloo.

One job is N local processes of ``vda-jax train`` with the launcher's environment variables,
each with ``devices / N`` CPU devices, so a run has the same mesh whatever N is.
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from vda_jax import cli
from vda_jax.checkpoint import load_checkpoint
from vda_jax.train.checkpoints import flat_arrays

# The README's tiny config at test size: 4 clips x 4 frames x 28x42 per step, 8 steps; the encoder
# frozen (as the paper trains), which compiles a smaller step.
TRAIN = ["--config", "configs/train/synthetic_tiny.py", "train_encoder=False", "synthetic.height=32",
         "synthetic.width=48", "synthetic.num_frames=8", "synthetic.num_videos=(6,2,0)", "data.clip_frames=4",
         "data.clip_hop=2", "data.crop_size=(28,42)", "batch_size=4", "sharding.min_fsdp_size=0",
         "optimizer.warmup_steps=2", "checkpoint.every=2", "eval.max_batches=1", "log_every=1", "progress_bar=False",
         "data.read_threads=1", "data.prefetch_batches=1"]
MESH_2X2X2 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
# Two devices: every cross-device sum has two terms, so gloo and the in-process collectives add
# in the same order. (On 2x2x2 the four-term sums of the two round differently by ~1e-7, which 8
# steps of training from scratch amplify to ~1e-3.)
MESH_2 = ("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # a hang guard; a run takes well under a minute on an idle 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job_env, processes: int, workdir, *overrides: str, devices: int = 2,
           extra=None) -> list[subprocess.Popen]:
    """Starts a ``vda-jax train`` job of ``processes`` local processes (``extra[i]``: more overrides for i);
    ``job_env(devices, **variables)`` gives a process's environment."""
    port = free_port()
    jobs = []
    for i in range(processes):
        env = job_env(devices // processes, PYTHONUNBUFFERED="1")
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        args = [sys.executable, "-m", "vda_jax.cli", "train", "--workdir", str(workdir), *TRAIN, *overrides,
                *(extra or {}).get(i, ())]
        jobs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))
    return jobs


def finish(jobs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> tuple[list[int], list[str]]:
    """Exit codes and outputs; kills the whole job if any process outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    outputs = []
    for job in jobs:
        try:
            outputs.append(job.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for j in jobs:
                j.kill()
            pytest.fail(f"the job did not finish within {timeout} s:\n" + "\n".join(j.communicate()[0] for j in jobs))
    return [job.returncode for job in jobs], outputs


def run(job_env, processes: int, workdir, *overrides: str, devices: int = 2) -> None:
    codes, outputs = finish(launch(job_env, processes, workdir, *overrides, devices=devices))
    assert codes == [0] * processes, "\n".join(outputs)


def flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_arrays(nnx.state(model)).items()}


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def job_env(tmp_path_factory, child_env):
    """A job process's environment: its CPU devices, and a compilation cache the module's jobs share."""
    return functools.partial(child_env, VDA_JAX_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, job_env):
    """The 8-step run on 2 processes x 4 devices (2x2x2): checkpoints at 2..8, evaluation and export at 8."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    run(job_env, 2, workdir, *MESH_2X2X2, "total_steps=8", "eval.every=8", devices=8)
    return workdir


def test_two_processes_train_evaluate_and_export(two_process_run, tmp_path, capsys):
    with open(two_process_run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    evaluation = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluation] == [8] and 0 < evaluation[0]["val_abs_rel"] < 10
    model = load_checkpoint(str(two_process_run / "model"))  # written once, by both processes together
    assert model.config.embed_dim == 64
    assert not [p for p in os.listdir(two_process_run) if p.startswith(".")]  # no temporary left

    # The exported model runs the long-video inference.
    out = tmp_path / "depth"
    assert cli.main(["infer", "--sample", "--checkpoint", str(two_process_run / "model"), "--output-dir", str(out),
                     "--input-size", "28", "--max-len", "12", "--save-npz", "--quiet"]) == 0
    depths = np.load(out / "sample_depths.npz")["depths"]
    assert depths.shape[0] == 12 and np.isfinite(depths).all()

    # Any kept checkpoint becomes a model directory; the best (the only evaluated) is the last.
    final = flat(model)
    assert cli.main(["checkpoint-to-model", str(two_process_run), str(tmp_path / "best")]) == 0
    assert cli.main(["checkpoint-to-model", str(two_process_run), str(tmp_path / "s4"), "--step", "4"]) == 0
    best, at_4 = flat(load_checkpoint(str(tmp_path / "best"))), flat(load_checkpoint(str(tmp_path / "s4")))
    for k in final:
        np.testing.assert_array_equal(best[k], final[k], err_msg=k)
    assert any(not np.array_equal(at_4[k], final[k]) for k in final)
    assert cli.main(["checkpoint-to-model", str(two_process_run), str(tmp_path / "s3"), "--step", "3"]) == 1
    assert "one of the kept steps [4, 6, 8]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s3")


def test_same_losses_on_one_process_and_resume_across_topologies(tmp_path, job_env):
    run(job_env, 2, tmp_path / "two", *MESH_2, "total_steps=8", "eval.every=0", "checkpoint.every=4")
    expected = losses(tmp_path / "two")
    # The same global batches and mesh on 1 process x 2 devices: the same losses.
    run(job_env, 1, tmp_path / "one", *MESH_2, "total_steps=8", "eval.every=0", "checkpoint.every=4")
    np.testing.assert_allclose([losses(tmp_path / "one")[s] for s in range(1, 9)],
                               [expected[s] for s in range(1, 9)], rtol=1e-5)

    # The 2-process checkpoint of step 4 resumed on 1 process: the same batches, so the same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "4", resumed / "checkpoints" / "4")
    run(job_env, 1, resumed, *MESH_2, "total_steps=8", "eval.every=0", "checkpoint.every=4")
    again = losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    np.testing.assert_allclose([again[s] for s in again], [expected[s] for s in again], rtol=1e-5)


def test_sigterm_on_one_process_checkpoints_and_stops_both(tmp_path, job_env):
    workdir = tmp_path / "run"
    jobs = launch(job_env, 2, workdir, *MESH_2, "total_steps=10000", "eval.every=0", "checkpoint.every=10000")
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(workdir / "metrics.jsonl") or len(losses(workdir)) < 2:
        assert time.monotonic() < deadline and all(j.poll() is None for j in jobs), "the job stopped early"
        time.sleep(0.2)
    jobs[1].send_signal(signal.SIGTERM)
    codes, outputs = finish(jobs)
    assert codes == [128 + signal.SIGTERM] * 2, "\n".join(outputs)
    saved = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
    assert saved == [max(losses(workdir))] and saved[0] < 10000
    assert "stopped by SIGTERM" in outputs[1] and "run the same command to resume" in outputs[0]


def test_failure_on_one_process_stops_both(tmp_path, job_env):
    # Process 1 reads its data from a folder that holds no dataset; process 0 would wait for it.
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    codes, outputs = finish(launch(job_env, 2, tmp_path / "run", *MESH_2, "total_steps=8",
                                   extra={1: [f"data.data_dir={empty}"]}), timeout=120)
    assert codes == [1, 1], "\n".join(outputs)
    assert time.monotonic() - start < 60 + 30  # 60 s after the failure, plus the start-up
    assert "is not built in" in outputs[1]
    assert "process 1 failed: ValueError" in outputs[0]
