"""Running real training from tests: `train.py` in a subprocess (as users run it), metrics from CSV."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

# A few fast steps of the debug tokenizer on the sample data, logging every step to CSV. The batches
# load in the training process: a loader worker costs each run ~3.5 s to start (torch and decord
# imported afresh), and the tests about workers (preemption, exact resume, SLURM's signals) ask
# for them by name.
FAST = (
    "experiment=demo_tokenizer",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.video_every_n_steps=0",
    "trainer.val_every_n_steps=1000",
    "trainer.limit_val_batches=1",
    "optim.warmup_steps=2",
    "data.frames=4",
    "data.global_batch_size=4",
    "data.num_workers=0",
)


def train(
    run_dir: Path, *overrides: str, sample_dir: Path, timeout: int = 300, **popen
) -> subprocess.CompletedProcess:
    """`python train.py FAST... overrides` with run_dir and the sample data; fails loudly on timeout."""
    command = [sys.executable, "train.py", *FAST, f"run_dir={run_dir}", f"data.root={sample_dir}", *overrides]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env(), **popen
    )


def start_training(run_dir: Path, *overrides: str, sample_dir: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "train.py", *FAST, f"run_dir={run_dir}", f"data.root={sample_dir}", *overrides]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), **popen
    )


def preempted_and_resumed(
    full_dir: Path, cut_dir: Path, *overrides: str, sample_dir: Path, after_step: int = 1
) -> tuple[int, dict[int, float], dict[int, float]]:
    """Train once uninterrupted (full_dir) and once SIGTERMed after `after_step` logged steps then
    resumed with resume=last (cut_dir). Returns (the step it stopped at, losses of each run)."""
    full = train(full_dir, *overrides, sample_dir=sample_dir)
    assert full.returncode == 0, full.stderr[-2000:]
    process = start_training(cut_dir, *overrides, sample_dir=sample_dir)
    deadline = time.time() + 120
    while time.time() < deadline and max(logged(cut_dir, "train/loss"), default=-1) < after_step:
        time.sleep(0.01)
    # Frozen at once (SIGSTOP acts in the kernel, not at a step boundary): a run of small steps
    # cannot finish between this seeing the step and the preemption. SIGTERM then takes effect at
    # the next step boundary once it runs again.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "preempted at step" in output, output[-2000:]
    stopped_at = int(output.split("preempted at step ")[1].split(";")[0])
    resumed = train(cut_dir, *overrides, "resume=last", sample_dir=sample_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return stopped_at, logged(full_dir, "train/loss"), logged(cut_dir, "train/loss")


def left_in_group(group: int, within: float = 20.0) -> list[str]:
    """The command lines of the live processes of process group `group`, once it has emptied or
    `within` seconds have passed (a killed process's helpers take a moment to notice)."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile
                if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(process.cmdline())[:160])
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def composed(*overrides: str):
    """configs/train.yaml composed with overrides, as train.py would (without running it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def scaling_sweep(
    launcher: str, tokenizer: Path | None, data: Path, sweep: Path, tokens_per_parameter: float
) -> list:
    """`python train.py experiment=scaling` over dynamics_debug and dynamics_xs with a submitit launcher,
    each size trained for `tokens_per_parameter` tokens per parameter on small clips; without a
    tokenizer, `data` is a token folder (data=tokens) that every size reads."""
    source = (f"task.tokenizer_checkpoint={tokenizer}",) if tokenizer else ("data=tokens",)
    return [
        *(sys.executable, "train.py", "experiment=scaling", f"hydra/launcher={launcher}"),
        *("model=dynamics_debug,dynamics_xs", f"scaling.tokens_per_parameter={tokens_per_parameter}"),
        *(*source, f"data.root={data}", f"hydra.sweep.dir={sweep}"),
        *("logger=csv", "data.frames=4", "data.global_batch_size=4", "data.num_workers=0"),
        *("trainer.video_every_n_steps=0", "trainer.limit_val_batches=1"),
    ]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric from a run's newest CSV log (the last value logged at each step)."""
    versions = sorted((Path(run_dir) / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    values: dict[int, float] = {}
    if not versions or not (versions[-1] / "metrics.csv").exists():
        return values
    path = versions[-1] / "metrics.csv"  # the newest run in this folder (a resume adds a version)
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values
