"""`worldmodel scaling`: collect the summary.json of finished runs and fit scaling laws.

Loss against size N (parameters) and against training compute C (FLOPs):
    L(x) = E + A * x^(-alpha)
E is the irreducible loss. The fit minimises squared error of log L (every point weighs the same
whatever its loss) over log A, alpha and E in [0, min L). It needs at least 4 runs; with 2 or 3,
E is fixed at 0 (a pure power law, a straight line in log-log) and the report says so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from worldmodel.training.budget import SUMMARY_NAME

MIN_RUNS_FOR_IRREDUCIBLE = 4


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = irreducible + scale * x^(-exponent)."""

    irreducible: float
    scale: float
    exponent: float
    with_irreducible: bool
    points: int

    def __call__(self, x):
        return self.irreducible + self.scale * np.asarray(x, dtype=float) ** -self.exponent

    def describe(self, variable: str) -> str:
        law = f"L({variable}) = {self.irreducible:.4g} + {self.scale:.4g} * {variable}^-{self.exponent:.4f}"
        if not self.with_irreducible:
            law += f"   (E fixed at 0: {self.points} runs; fitting E needs {MIN_RUNS_FOR_IRREDUCIBLE})"
        return law


def fit_power_law(x, loss) -> PowerLaw:
    """Fit L = E + A x^-alpha to positive (x, loss) points (see the module docstring)."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise ValueError(f"a power law needs runs of at least 2 different sizes, got {x.tolist()}")
    if (x <= 0).any() or (loss <= 0).any():
        raise ValueError("sizes and losses must be positive")
    log_x, log_loss = np.log(x), np.log(loss)
    slope, intercept = np.polyfit(log_x, log_loss, 1)  # the pure power law: a line in log-log
    if len(x) < MIN_RUNS_FOR_IRREDUCIBLE:
        return PowerLaw(0.0, math.exp(intercept), -slope, False, len(x))

    floor = loss.min()

    def residuals(params):
        log_scale, exponent, irreducible = params
        return np.log(irreducible + np.exp(log_scale - exponent * log_x)) - log_loss

    best = None
    for share in (0.0, 0.5, 0.9):  # start with E at 0, half and most of the lowest loss
        start_irreducible = share * floor
        above = np.log(loss - start_irreducible)
        start_slope, start_intercept = np.polyfit(log_x, above, 1)
        start = [start_intercept, max(-start_slope, 1e-3), start_irreducible]
        result = least_squares(
            residuals,
            start,
            bounds=([-np.inf, 0.0, 0.0], [np.inf, 10.0, floor * (1 - 1e-9)]),
            x_scale="jac",
            max_nfev=20_000,
        )
        if best is None or result.cost < best.cost:
            best = result
    log_scale, exponent, irreducible = best.x
    return PowerLaw(float(irreducible), float(math.exp(log_scale)), float(exponent), True, len(x))


def collect(folders: list[str | os.PathLike]) -> list[dict]:
    """summary.json of each run folder, or of every run below a sweep folder."""
    runs = []
    for folder in map(Path, folders):
        found = (
            [folder / SUMMARY_NAME]
            if (folder / SUMMARY_NAME).is_file()
            else sorted(folder.rglob(SUMMARY_NAME))
        )
        if not found:
            raise FileNotFoundError(f"{folder}: no {SUMMARY_NAME} in it or below (has a run finished there?)")
        for path in found:
            summary = json.loads(path.read_text())
            summary["run"] = str(path.parent)
            runs.append(summary)
    return runs


def final_loss(run: dict) -> float:
    """The run's loss: validation when it has one, else the last training loss."""
    for key in ("val_loss", "train_loss"):
        if run.get(key) is not None:
            return float(run[key])
    raise KeyError(f"{run['run']}/{SUMMARY_NAME}: no val_loss or train_loss")


def table(runs: list[dict]) -> str:
    lines = ["| run | preset | parameters | tokens | FLOPs | loss |", "|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: r["parameters"]):
        lines.append(
            f"| {Path(run['run']).name} | {run['preset']} | {run['parameters']:.4g} | {run['tokens']:.4g} "
            f"| {run['flops']:.4g} | {final_loss(run):.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], fits: dict[str, PowerLaw], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    loss = [final_loss(run) for run in runs]
    for ax, (key, label) in zip(
        axes, (("parameters", "parameters N"), ("flops", "training FLOPs C")), strict=True
    ):
        x = np.array([run[key] for run in runs], dtype=float)
        ax.scatter(x, loss, color="black", zorder=3, label="runs")
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        fit = fits[key]
        ax.plot(grid, fit(grid), label=f"fit, exponent {fit.exponent:.3f}")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="final loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def analyze(folders: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Fit L(N) and L(C) over the runs; write scaling.json, scaling.md and scaling.png into `out`."""
    runs = collect(folders)
    loss = [final_loss(run) for run in runs]
    fits = {key: fit_power_law([run[key] for run in runs], loss) for key in ("parameters", "flops")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"runs": runs, "fits": {key: asdict(fit) for key, fit in fits.items()}}
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(runs) + "\n" + fits["parameters"].describe("N") + "\n" + fits["flops"].describe("C") + "\n"
    (out / "scaling.md").write_text(text)
    plot(runs, fits, out / "scaling.png")
    report["text"] = text
    return report
