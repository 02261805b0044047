"""slurm/train.sbatch on a real two-node SLURM cluster on this one machine (two slurmd daemons,
tests/slurm_cluster.py): DDP and DeepSpeed over gloo across nodes, and a preempted two-node job
that requeues itself and resumes exactly."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from tests.slurm_cluster import LocalSlurm, SlurmUnavailable
from tests.test_slurm import release_requeued
from tests.training_helpers import FAST, ROOT, logged

pytestmark = pytest.mark.slow

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm2"), cpus=1, nodes=2) as running:
            yield running
    except SlurmUnavailable as error:
        if os.environ.get("WORLDMODEL_REQUIRE_SLURM"):  # CI: a missing cluster is a failure
            raise
        pytest.skip(str(error))


def sbatch_train(cluster: LocalSlurm, *overrides: str, log, run_dir) -> str:
    result = cluster.run(
        "sbatch", "--parsable", f"--output={log}", *TWO_NODES, "slurm/train.sbatch", *overrides,
        cwd=ROOT, extra_env={"PYTHON": sys.executable, "WANDB_MODE": "offline", "RUN_DIR": str(run_dir)},
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_sbatch_trains_across_two_nodes_one_rank_on_each(two_nodes, sample_dir, tmp_path, strategy):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    overrides = (*FAST, f"data.root={sample_dir}", "trainer.max_steps=4", f"strategy={strategy}")
    job = sbatch_train(two_nodes, *overrides, log=log, run_dir=run_dir)
    state = two_nodes.wait_for(job, {"COMPLETED"}, timeout=300)
    output = log.read_text(errors="replace")
    assert state == "COMPLETED", output[-3000:]
    assert "2 node(s) x 1 task(s), trainer=cpu" in output and "done: 4 steps" in output
    # Node rank and main address come from SLURM (SLURM_NODEID, the job's first node).
    first = two_nodes.nodes[0]
    assert f"rank 0/2: node 0 ({first}), local rank 0, main address {first}:" in output
    assert f"rank 1/2: node 1 ({first}-2), local rank 0, main address {first}:" in output
    assert sorted(logged(run_dir, "train/loss")) == [0, 1, 2, 3]


def test_a_preempted_two_node_job_requeues_itself_and_resumes_exactly(two_nodes, sample_dir, tmp_path):
    max_steps = 60
    overrides = (*FAST, f"data.root={sample_dir}", f"trainer.max_steps={max_steps}")
    overrides += ("trainer.checkpoint_every_n_steps=0", "data.num_workers=1")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = sbatch_train(two_nodes, *overrides, log=tmp_path / "full.out", run_dir=full_dir)
    assert two_nodes.wait_for(full, {"COMPLETED"}, timeout=300) == "COMPLETED"

    log = tmp_path / "cut.out"
    job = sbatch_train(two_nodes, *overrides, log=log, run_dir=cut_dir)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and max(logged(cut_dir, "train/loss"), default=-1) < 3:
        assert two_nodes.job_state(job) in {"PENDING", "RUNNING"}, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    two_nodes.run("scancel", "--signal=USR1", job)  # every task on both nodes
    release_requeued(two_nodes, job)
    state = two_nodes.wait_for(job, {"COMPLETED"}, timeout=300)
    output = log.read_text(errors="replace")
    assert state == "COMPLETED" and two_nodes.job_field(job, "Restarts") == "1", output[-3000:]
    stopped_at = int(output.split("preempted at step ")[1].split(";")[0])
    assert 3 <= stopped_at < max_steps - 10 and f"done: {max_steps} steps" in output
    assert "start 2:" in output  # the requeued start, as the script numbers it
    expected, resumed = logged(full_dir, "train/loss"), logged(cut_dir, "train/loss")
    after = [step for step in sorted(resumed) if step >= stopped_at]
    assert after == list(range(stopped_at, max_steps))
    assert [resumed[step] for step in after] == [expected[step] for step in after]
    final = [
        torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for folder in (full_dir, cut_dir)
    ]
    for name, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][name]), name
