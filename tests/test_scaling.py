"""Compute budgets and the scaling-law fits of `worldmodel scaling`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldmodel.config import ConfigError, ScalingConfig, TrainConfig
from worldmodel.eval.scaling import fit_power_law
from worldmodel.training.budget import RunSize, budget_steps

WORLDMODEL = Path(sys.executable).with_name("worldmodel")


def synthetic(x, irreducible=1.7, scale=12.0, exponent=0.28, noise=0.0, seed=0):
    x = np.asarray(x, dtype=float)
    loss = irreducible + scale * x**-exponent
    return loss * (1 + noise * np.random.default_rng(seed).standard_normal(len(x)))


@pytest.mark.parametrize("noise", [0.0, 0.0005])
def test_the_fit_recovers_the_exponent_of_a_power_law_with_an_irreducible_term(noise):
    sizes = np.geomspace(1e5, 1e9, 9)
    fit = fit_power_law(sizes, synthetic(sizes, noise=noise))
    assert fit.with_irreducible
    assert abs(fit.exponent - 0.28) / 0.28 < 0.02
    assert abs(fit.irreducible - 1.7) / 1.7 < 0.02


def test_too_few_runs_for_the_irreducible_term_fit_a_pure_power_law_and_say_so():
    sizes = np.array([1e6, 1e7, 1e8])
    fit = fit_power_law(sizes, 5.0 * sizes**-0.1)  # an exact pure power law
    assert not fit.with_irreducible and fit.irreducible == 0.0
    assert abs(fit.exponent - 0.1) < 1e-9 and "fitting E needs 4" in fit.describe("N")
    with pytest.raises(ValueError, match="at least 2 different sizes"):
        fit_power_law([1e6, 1e6], [3.0, 3.1])


def test_budgets_turn_model_size_into_steps():
    size = RunSize(parameters=1_000_000, flops_per_token=6e6, tokens_per_step=4096)
    config = TrainConfig()
    config.scaling = ScalingConfig(budget="tokens_per_parameter", tokens_per_parameter=20)
    assert budget_steps(config, size) == 4883  # ceil(20e6 / 4096)
    config.scaling = ScalingConfig(budget="flops", flops=6e6 * 4096 * 100)
    assert budget_steps(config, size) == 100
    with pytest.raises(ConfigError, match="scaling.flops"):
        ScalingConfig(budget="flops")
    with pytest.raises(ConfigError, match="scaling.budget"):
        ScalingConfig(budget="tokens")


def test_worldmodel_scaling_reads_run_folders_and_writes_table_fits_and_plot(tmp_path):
    parameters = np.geomspace(1e5, 1e8, 6)
    flops = 6 * 20 * parameters**2  # 20 tokens per parameter: C = 6 N D
    for index, (n, c, loss) in enumerate(zip(parameters, flops, synthetic(parameters), strict=True)):
        run = tmp_path / "sweep" / f"{index}_size"
        run.mkdir(parents=True)
        summary = {"preset": f"size{index}", "parameters": n, "flops": c, "tokens": 20 * n, "val_loss": loss}
        (run / "summary.json").write_text(json.dumps(summary))
    result = subprocess.run(
        [str(WORLDMODEL), "scaling", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert len(report["runs"]) == 6
    assert abs(report["fits"]["parameters"]["exponent"] - 0.28) / 0.28 < 0.02
    assert abs(report["fits"]["flops"]["exponent"] - 0.14) / 0.14 < 0.02  # N ~ C^(1/2)
    assert "L(N) = " in result.stdout and "| size5 |" in result.stdout
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000
    missing = subprocess.run(
        [str(WORLDMODEL), "scaling", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no summary.json" in missing.stderr


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_the_scaling_ladder_on_this_machine_from_one_token_folder(
    sample_dir, tokenizer_checkpoint, tmp_path
):
    from tests.training_helpers import ROOT, scaling_sweep
    from worldmodel.data.tokens import tokenize

    tokens, sweep = tmp_path / "tokens", tmp_path / "sweep"
    tokenize(tokenizer_checkpoint, sample_dir, tokens, frames=4, hop=4)  # once, for every size
    command = scaling_sweep("submitit_local", None, tokens, sweep, tokens_per_parameter=0.02)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    presets = {json.loads(path.read_text())["preset"] for path in sweep.glob("*/summary.json")}
    assert presets == {"dynamics_debug", "dynamics_xs"}
