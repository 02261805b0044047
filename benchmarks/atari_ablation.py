"""Ablations of the Atari recipe (`make atari`): what each choice buys, with the same eval.

Every variant is the whole path a user runs: `worldmodel prepare atari` -> `train.py
experiment=atari_cpu/tokenizer` -> `train.py experiment=atari_cpu/dynamics` -> `worldmodel eval`
on the held-out episodes, with the same step counts as `make atari`, changed by one or a few
Hydra overrides from the recipe. Runs go in parallel (`--parallel`) on one machine; on 2 CPU
cores a variant takes an hour. The step counts, not the device, define a variant, so GPU numbers
stand for the CPU recipe up to run-to-run spread (which the seed variants measure). On a GPU the
runs are bound by video decoding on the host's cores: one H200 with 16 cores ran 15 variants at
once at ~4 steps/s each; run a few at a time.

    python benchmarks/atari_ablation.py --out benchmarks/out/ablation --accelerator gpu --parallel 4
    python benchmarks/atari_ablation.py --out /tmp/smoke --scale 0.01 --episodes 3 --only recipe

Writes `results.json` (every variant's eval report) and `results.md` (the ablation table) in
`--out`, updated as variants finish, so a run stopped by `--deadline` keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GAMES = "Boxing,Riverraid"
OTHER_GAMES = "Pong,SpaceInvaders"  # little moves: copying the last frame is hard to beat

# Recorded data: name -> (games, extra `prepare atari` arguments).
DATASETS = {
    "held": (GAMES, []),  # the recipe: no sticky actions, each random action held 1..8 steps
    "per_step": (GAMES, ["--sticky", "0.25", "--max-hold", "1"]),  # before: a new action every step
    "other_games": (OTHER_GAMES, []),
}
# Tokenizers: name -> (dataset, overrides of experiment=atari_cpu/tokenizer).
TOKENIZERS = {
    "recipe": ("held", []),
    "per_step": ("per_step", []),
    "other_games": ("other_games", []),
    "3x_steps": ("held", ["trainer.max_steps=3000"]),
}


@dataclass
class Variant:
    name: str
    tokenizer: str
    overrides: list[str] = field(default_factory=list)  # of experiment=atari_cpu/dynamics
    eval_args: list[str] = field(default_factory=list)
    note: str = ""


VARIANTS = [
    Variant("recipe", "recipe", note="the recipe"),
    Variant("recipe_seed1", "recipe", ["seed=1", "data.seed=1"], note="spread"),
    Variant("recipe_seed2", "recipe", ["seed=2", "data.seed=2"], note="spread"),
    Variant(
        "before",
        "per_step",
        ["model.action_conditioning=add", "task.clean_context=false"],
        note="the previous recipe: per-step actions, summed action, masked context",
    ),
    Variant("per_step_actions", "per_step", note="data: a new random action every step, sticky 0.25"),
    Variant(
        "add_conditioning", "recipe", ["model.action_conditioning=add"], note="action summed into tokens"
    ),
    Variant("adaln_conditioning", "recipe", ["model.action_conditioning=adaln"], note="adaptive norms"),
    Variant(
        "masked_context", "recipe", ["task.clean_context=false"], note="Genie: context masked like targets"
    ),
    Variant(
        "masked_context_2x_steps",
        "recipe",
        ["task.clean_context=false", "trainer.max_steps=3000"],
        note="the same at equal CPU time (a masked step costs half)",
    ),
    Variant("context_noise", "recipe", ["task.context_noise=0.1"], note="up to 10% of context tokens random"),
    Variant("steps_3x", "recipe", ["trainer.max_steps=4500"], note="3x the dynamics steps"),
    Variant("tokenizer_3x_steps", "3x_steps", note="3x the tokenizer steps"),
    Variant("maskgit_8_steps", "recipe", eval_args=["--steps", "8"], note="eval decodes in 8 MaskGIT steps"),
    Variant("maskgit_1_step", "recipe", eval_args=["--steps", "1"], note="eval decodes in 1 step"),
    Variant("other_games", "other_games", note=f"the recipe on {OTHER_GAMES}"),
]


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in `log`; seconds taken. Raises on failure, naming the log."""
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({result.returncode}); see {log}")
    return time.perf_counter() - started


def train_command(experiment: str, run_dir: Path, overrides: list[str], args) -> list[str]:
    """The command of one fresh training run; what an earlier call left in run_dir is cleared (a
    run_dir holding another run's checkpoints is refused)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    scaled = []
    steps = next((o for o in overrides if o.startswith("trainer.max_steps=")), None)
    if args.scale != 1.0:
        base = int(steps.split("=")[1]) if steps else (1000 if "tokenizer" in experiment else 1500)
        scaled = [f"trainer.max_steps={max(2, int(base * args.scale))}", "trainer.val_every_n_steps=1"]
        scaled += ["trainer.checkpoint_every_n_steps=0", "trainer.video_every_n_steps=0"]
    return [
        sys.executable,
        "train.py",
        f"experiment={experiment}",
        f"run_dir={run_dir}",
        "logger=csv",
        f"trainer.accelerator={args.accelerator}",
        *overrides,
        *scaled,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    parser.add_argument("--episodes", type=int, default=48, help="episodes recorded per game")
    parser.add_argument("--clips", type=int, default=128, help="held-out clips scored")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; later jobs are skipped")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    variants = [v for v in VARIANTS if args.only is None or v.name in args.only.split(",")]
    tokenizers = {v.tokenizer for v in variants}
    datasets = {TOKENIZERS[t][0] for t in tokenizers}
    results: dict[str, dict] = {}

    def in_time() -> bool:
        return args.deadline is None or time.perf_counter() - started < args.deadline

    def record(name: str) -> None:
        games, extra = DATASETS[name]
        command = [sys.executable, "-m", "worldmodel.cli", "prepare", "atari", "--games", games]
        command += ["--episodes", str(args.episodes), "--max-steps", "500", "--frames", "16", "--size", "64"]
        command += ["--workers", "4", "--out", str(args.out / "data" / name), *extra]
        run(command, args.out / f"record_{name}.log")

    def tokenizer(name: str) -> None:
        dataset, overrides = TOKENIZERS[name]
        run_dir = args.out / "tokenizer" / name
        command = train_command(
            "atari_cpu/tokenizer", run_dir, [f"data.root={args.out / 'data' / dataset}", *overrides], args
        )
        results.setdefault("_tokenizer_seconds", {})[name] = run(command, args.out / f"tokenizer_{name}.log")

    def dynamics(variant: Variant) -> None:
        if not in_time():
            return
        dataset = TOKENIZERS[variant.tokenizer][0]
        run_dir = args.out / "dynamics" / variant.name
        data = args.out / "data" / dataset
        tokenizer_checkpoint = args.out / "tokenizer" / variant.tokenizer / "checkpoints" / "last.ckpt"
        overrides = [
            f"data.root={data}",
            f"task.tokenizer_checkpoint={tokenizer_checkpoint}",
            *variant.overrides,
        ]
        seconds = run(
            train_command("atari_cpu/dynamics", run_dir, overrides, args),
            args.out / f"dynamics_{variant.name}.log",
        )
        eval_dir = args.out / "eval" / variant.name
        command = [sys.executable, "-m", "worldmodel.cli", "eval", str(run_dir / "checkpoints" / "last.ckpt")]
        command += ["--data", str(data), "--context", "4", "--horizon", "8", "--clips", str(args.clips)]
        command += ["--steps", "4", "--out", str(eval_dir), *variant.eval_args]
        command += ["--device", "cuda" if args.accelerator == "gpu" else "cpu"]
        eval_seconds = run(command, args.out / f"eval_{variant.name}.log")
        report = json.loads((eval_dir / "last.ckpt" / "metrics.json").read_text())
        results[variant.name] = {
            "note": variant.note,
            "tokenizer": variant.tokenizer,
            "dataset": dataset,
            "overrides": variant.overrides,
            "eval_args": variant.eval_args,
            "train_seconds": seconds,
            "eval_seconds": eval_seconds,
            "at_horizon": report["at_horizon"],
            "by_source": {s: r["at_horizon"] for s, r in report["by_source"].items()},
        }
        write(results, args.out)

    # Each job waits for the one it needs (data -> tokenizer -> dynamics); submitted in that order,
    # so a waiting job never holds back the one it waits for.
    with ThreadPoolExecutor(args.parallel) as pool:
        recorded = {name: pool.submit(record, name) for name in sorted(datasets)}
        tokenized = {
            name: pool.submit(lambda n: (recorded[TOKENIZERS[n][0]].result(), tokenizer(n)), name)
            for name in sorted(tokenizers)
        }
        futures = {
            v.name: pool.submit(lambda v: (tokenized[v.tokenizer].result(), dynamics(v)), v) for v in variants
        }
        for name, future in futures.items():
            try:
                future.result()
            except RuntimeError as error:
                print(f"{name}: {error}", flush=True)
    write(results, args.out)
    print((args.out / "results.md").read_text())
    print(f"total {time.perf_counter() - started:.0f} s")


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| variant | game | gain over copy-last @1 / @4 / @8 (dB) | ΔtPSNR @4 | SSIM − copy @1 / @4 / @8 "
        "| tokenizer @4 | what changed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if name.startswith("_"):
            continue
        for source, at in {**result["by_source"], "all": result["at_horizon"]}.items():
            gains = " / ".join(
                f"{at[h]['model_psnr'] - at[h]['copy_last_psnr']:+.2f}" for h in ("1", "4", "8")
            )
            ssims = " / ".join(
                f"{at[h]['model_ssim'] - at[h]['copy_last_ssim']:+.3f}" for h in ("1", "4", "8")
            )
            delta = at["4"].get("delta_t_psnr")
            lines.append(
                f"| {name} | {source.removeprefix('atari/')} | {gains} | "
                f"{'-' if delta is None else f'{delta:+.2f}'} | {ssims} | {at['4']['tokenizer_psnr']:.2f} | "
                f"{result['note']} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
