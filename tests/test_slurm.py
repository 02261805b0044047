"""slurm/train.sbatch and slurm/eval.sbatch on a real single-node SLURM cluster (tests/slurm_cluster.py)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import LocalSlurm, SlurmUnavailable
from tests.training_helpers import FAST, ROOT, logged, scaling_sweep

pytestmark = pytest.mark.slow

CPU_TASKS = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as running:
            yield running
    except SlurmUnavailable as error:
        if os.environ.get("WORLDMODEL_REQUIRE_SLURM"):  # CI: a missing cluster is a failure
            raise
        pytest.skip(str(error))


def submit(cluster: LocalSlurm, script: str, *arguments: str, log: Path, **env: str) -> str:
    """sbatch a script of slurm/ from the repository root, as users do; returns the job id."""
    result = cluster.run(
        "sbatch", "--parsable", f"--output={log}", *_resources(script), f"slurm/{script}",
        *arguments, cwd=ROOT, extra_env={"PYTHON": sys.executable, "WANDB_MODE": "offline", **env},
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def release_requeued(cluster: LocalSlurm, job: str) -> None:
    """Wait until the job has requeued itself, then skip SLURM's 120 s hold on requeued jobs (BeginTime)
    so the test stays short. Released only once the first start has left the node and a second has
    passed: earlier, its exit status or its revoked credential can fail the requeued job. The job
    does the rest itself."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and cluster.job_field(job, "Restarts") != "1":
        time.sleep(0.5)
    cluster.wait_for(job, {"PENDING"}, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and cluster.job_processes_alive(job):
        time.sleep(0.2)
    # slurmd revoked the first start's credential when it killed it, and refuses a credential made
    # in the same second as that (times in whole seconds): released at once, the restart was
    # killed as "non-startable: Job credential revoked" and the job ended FAILED (seen under load).
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def _resources(script: str) -> tuple[str, ...]:
    return CPU_TASKS if script == "train.sbatch" else ("--cpus-per-task=1",)


def test_sbatch_trains_on_two_tasks_leaves_a_checkpoint_and_eval_sbatch_scores_it(
    cluster, sample_dir, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = (*FAST, f"data.root={sample_dir}", "trainer.max_steps=4", f"run_dir={run_dir}")
    job = submit(cluster, "train.sbatch", *overrides, log=tmp_path / "train.out")
    state = cluster.wait_for(job, {"COMPLETED"}, timeout=240)
    output = (tmp_path / "train.out").read_text()
    assert state == "COMPLETED", output[-3000:]
    assert "2 task(s), trainer=cpu" in output and "done: 4 steps" in output
    assert f"run folder {run_dir}\n" in output  # the folder given as an override, where it really writes
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["config"]["trainer"]["devices"] == 2  # one rank per task

    eval_dir = tmp_path / "eval"
    checkpoint_path = str(run_dir / "checkpoints" / "last.ckpt")
    arguments = (
        checkpoint_path,
        "--data",
        str(sample_dir),
        "--context",
        "2",
        "--horizon",
        "2",
        "--clips",
        "2",
    )
    job = submit(cluster, "eval.sbatch", *arguments, log=tmp_path / "eval.out", EVAL_DIR=str(eval_dir))
    assert cluster.wait_for(job, {"COMPLETED"}, timeout=120) == "COMPLETED"
    assert (eval_dir / "last.ckpt" / "metrics.json").is_file(), (tmp_path / "eval.out").read_text()[-3000:]


def test_a_submitit_slurm_sweep_over_two_sizes_completes_both_jobs_and_feeds_worldmodel_scaling(
    cluster, sample_dir, tokenizer_checkpoint, tmp_path
):
    sweep = tmp_path / "sweep"
    command = scaling_sweep(
        "submitit_slurm", tokenizer_checkpoint, sample_dir, sweep, tokens_per_parameter=0.05
    )
    command += [
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
    ]
    result = cluster.run(*command, check=False, cwd=ROOT, timeout=420, extra_env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # One array job, one task per size: .submitit/<array>_<task>/
    jobs = sorted(
        path.name for path in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", path.name)
    )
    assert len(jobs) == 2
    for job in jobs:  # submitit returns once results are written; SLURM may still be COMPLETING
        assert cluster.wait_for(job, {"COMPLETED"}, timeout=60) == "COMPLETED"
    summaries = {
        summary["preset"]: summary
        for summary in (json.loads(path.read_text()) for path in sweep.glob("*/summary.json"))
    }
    assert set(summaries) == {"dynamics_debug", "dynamics_xs"}
    for summary in summaries.values():  # each size trained for its own budget: 0.05 tokens per parameter
        assert summary["steps"] == math.ceil(0.05 * summary["parameters"] / summary["tokens_per_step"])
        assert summary["val_loss"] > 0
    scaling = subprocess.run(
        [
            str(Path(sys.executable).with_name("worldmodel")),
            "scaling",
            str(sweep),
            "--out",
            str(tmp_path / "fit"),
        ],
        capture_output=True,
        text=True,
    )
    assert scaling.returncode == 0, scaling.stderr
    assert "| dynamics_xs |" in scaling.stdout and "E fixed at 0: 2 runs" in scaling.stdout
    assert (tmp_path / "fit" / "scaling.png").is_file()


def test_a_preempted_submitit_job_checkpoints_requeues_and_the_sweep_finishes(cluster, sample_dir, tmp_path):
    sweep, max_steps = tmp_path / "sweep", 80
    command = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_slurm", "model=tokenizer_debug"]
    command += [*FAST, f"data.root={sample_dir}", f"trainer.max_steps={max_steps}", "resume=last"]
    command += ["trainer.checkpoint_every_n_steps=0", f"hydra.sweep.dir={sweep}"]
    command += [
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=2",
    ]
    launcher = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**cluster.env, "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    run_dir = sweep / "0_tokenizer_debug"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and max(logged(run_dir, "train/loss"), default=-1) < 3:
        assert launcher.poll() is None, launcher.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    # A sweep of one run is one plain job; submitit names its folder after the job id.
    (job,) = [path.name for path in (sweep / ".submitit").iterdir() if path.name.isdigit()]
    # What submitit asks SLURM to send before the limit.
    signalled = cluster.run("scancel", "--signal=USR2", job, check=False)
    assert signalled.returncode == 0, signalled.stderr + cluster.run("squeue", check=False).stdout
    release_requeued(cluster, job)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output.decode()[-3000:]
    log = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()  # task 0's log
    stopped_at = int(log.split("preempted at step ")[1].split(";")[0])
    assert 3 <= stopped_at < max_steps - 10 and f"done: {max_steps} steps" in log
    assert sorted(logged(run_dir, "train/loss"))[0] == stopped_at  # the requeued start resumed there
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == max_steps
