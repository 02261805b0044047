"""The scripts for a real GPU, kept working by running them on the CPU with tiny settings:
benchmarks/gpu_check.sh (GPU_CHECK_TINY=1): every check but the GPU's own (nvidia-smi) passes and
the strategy table and its JSON are written; benchmarks/atari_long_gpu.sh (ATARI_LONG_TINY=1):
`make atari-long` runs through the Makefile without the project's venv, for the seed given, and
every checkpoint of its learning curve is scored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training_helpers import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_every_check_on_the_cpu_with_tiny_settings(tmp_path):
    env = {**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = (tmp_path / "gpu_check.md").read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    failed = [line for line in report.splitlines() if line.startswith("- FAIL") and "FAIL env " not in line]
    assert not failed, "\n".join(failed)
    passed = {line.split()[2] for line in report.splitlines() if line.startswith("- PASS")}
    strategies = {f"strategy_{name}" for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")}
    checks = {"tokenizer", "eval", "scale", "rollout", "tokenize", "from_tokens"}
    assert checks | strategies <= passed
    assert "| dynamics_debug | 4 |" in report and "| KV cache |" in report  # the tables made it in
    (results,) = tmp_path.glob("gpu-*.json")
    runs = json.loads(results.read_text())["runs"]
    assert set(runs) == {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
    for name, run in runs.items():  # one device, the same seed: every strategy trains alike
        assert run["tokens_per_s"] > 0 and run["vs_ddp"] < 1e-4, (name, run)


def test_atari_long_gpu_runs_make_atari_long_for_the_given_seed_without_a_venv_and_scores_every_checkpoint(
    tmp_path,
):
    # One seed, and not the default 0: the run must land in seed1/ and train from seed 1 (a second
    # seed would only repeat the loop, at a minute a seed).
    env = {**os.environ, "ATARI_LONG_TINY": "1", "PYTHON": sys.executable, "SEEDS": "1"}
    out = tmp_path / "atari-long"
    result = subprocess.run(
        ["bash", "benchmarks/atari_long_gpu.sh", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "-m venv" not in result.stdout  # the Makefile took the stand-ins for its venv, built none
    assert sorted(path.name for path in out.iterdir()) == ["seed1"]
    run = out / "seed1"
    curve = {
        Path(json.loads(path.read_text())["checkpoint"]).name: json.loads(path.read_text())
        for path in (run / "eval_curve").glob("*/metrics.json")
    }
    assert sorted(curve) == ["step0000002.ckpt", "step0000004.ckpt"], sorted(curve)
    assert (run / "eval_curve" / "comparison.md").exists()
    last = json.loads((run / "eval" / "last.ckpt" / "metrics.json").read_text())
    assert all(report["clips"] == 4 for report in [last, *curve.values()])
    for stage in ("tokenizer", "dynamics"):
        checkpoint = torch.load(run / stage / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["hyper_parameters"]["config"]["seed"] == 1, stage
