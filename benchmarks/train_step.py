"""The training path against a bare PyTorch loop, achieved FLOP/s, and ZeRO-3 vs DDP memory.

    python benchmarks/train_step.py                 # all three parts
    python benchmarks/train_step.py step-time --model tokenizer_s --steps 30
    python benchmarks/train_step.py memory --model tokenizer_m

step-time: the same model, the same in-memory batches and the same AdamW + clipping + schedule,
once through worldmodel's Lightning module and Trainer (with its telemetry callbacks) and once in
a hand-written loop; wall time per step after warm-up, and the achieved FLOP/s (flops.py) against
the measured fp32 matmul peak of this machine.

memory: peak resident memory of each of 2 CPU ranks while training (up to the end of the last
step, before the final checkpoint save, which rank 0 alone does), DDP against DeepSpeed ZeRO-3
and FSDP2, same model, micro-batch 1 with activation checkpointing (model states dominate, as at
scale), and how much of it the run added over the process after its imports; `--override
strategy.X=Y` (repeated) changes the sharded runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worldmodel.training.callbacks import DataPosition, measure_cpu_peak_flops  # noqa: E402
from worldmodel.training.modules import TokenizerModule, warmup_cosine  # noqa: E402
from worldmodel.training.run import build_trainer, fit, prepare, to_train_config  # noqa: E402

OUT = ROOT / "benchmarks" / "out"


def config_for(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        composed = compose(
            "train",
            overrides=[
                f"model={model}",
                "logger=csv",
                f"run_dir={OUT / 'train_step'}",
                "trainer.checkpoint_every_n_steps=0",
                "trainer.video_every_n_steps=0",
                "trainer.val_every_n_steps=100000",
                "trainer.log_every_n_steps=10",
                *overrides,
            ],
        )
    return to_train_config(composed)


def fixed_batches(count: int, batch: int, frames: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "video": torch.randint(
                0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, generator=generator
            ),
            "actions": torch.full((batch, frames), -1),
        }
        for _ in range(count)
    ]


class StepClock:
    """Wall time from the end of warm-up to the end of the run."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.started = 0.0

    def tick(self, step: int) -> None:
        if step == self.warmup:
            self.started = time.perf_counter()

    def per_step(self, steps: int) -> float:
        return (time.perf_counter() - self.started) / (steps - self.warmup)


def lightning_step_time(config, batches: list[dict], warmup: int) -> tuple[float, float]:
    import lightning as L

    clock = StepClock(warmup)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            clock.tick(trainer.global_step)

    module = TokenizerModule(config)
    flops_per_token = module.flops_per_token(batches[0]["video"])
    trainer = build_trainer(config)
    # In-memory batches instead of the streaming loader: the loader has its own benchmark.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, DataPosition)] + [Clock()]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return clock.per_step(len(batches)), flops_per_token


def bare_step_time(config, batches: list[dict], warmup: int) -> float:
    torch.manual_seed(config.seed)
    module = TokenizerModule(config)
    module.configure_model()
    net = module.net
    optim = config.optim
    from worldmodel.training.modules import decay_groups

    optimizer = torch.optim.AdamW(
        decay_groups(net, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, len(batches), optim.min_lr_ratio)
    )
    clock = StepClock(warmup)
    for step, batch in enumerate(batches):
        clock.tick(step)
        loss, _ = net.training_loss(batch["video"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return clock.per_step(len(batches))


def step_time(args) -> None:
    config = config_for(args.model, f"trainer.max_steps={args.steps}", f"data.frames={args.frames}")
    batches = fixed_batches(args.steps, args.batch, args.frames, 64)
    tokens_per_step = args.batch * args.frames * (64 // config_downsample(config)) ** 2
    bare = bare_step_time(config, batches, args.warmup)
    project, flops_per_token = lightning_step_time(config, batches, args.warmup)
    peak = measure_cpu_peak_flops()
    achieved = flops_per_token * tokens_per_step / project
    shape = f"{args.batch}x{args.frames}x64x64"
    print(f"model {args.model}, batch {shape}, {args.steps} steps ({args.warmup} warm-up)")
    print(f"| bare PyTorch loop | {bare * 1e3:.1f} ms/step | 1.00x |")
    print(
        f"| worldmodel (Lightning module + callbacks) | {project * 1e3:.1f} ms/step | {project / bare:.3f}x |"
    )
    print(
        f"achieved {achieved / 1e9:.1f} GFLOP/s of a measured {peak / 1e9:.1f} GFLOP/s fp32 matmul peak "
        f"(MFU {achieved / peak:.1%})"
    )


def config_downsample(config) -> int:
    from worldmodel.models.presets import preset

    return preset(config.model.preset).downsample


def memory_rank(args) -> None:
    """One rank of a 2-process run (Lightning starts the second); prints its peak RSS."""
    run_dir = OUT / f"memory_{args.strategy}"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # rank 0, before it starts rank 1: clear an
        shutil.rmtree(run_dir, ignore_errors=True)  # earlier measurement's run (a fresh run refuses it)
    config = config_for(
        args.model,
        f"strategy={args.strategy}",
        "trainer.devices=2",
        f"trainer.max_steps={args.steps}",
        "data.frames=4",
        "data.global_batch_size=2",  # micro-batch 1 per rank, activation checkpointing on:
        "model.checkpointing=true",  # model states dominate, as at scale
        "data.num_workers=0",
        f"data.root={args.data}",
        f"run_dir={run_dir}",
        *args.override,
    )
    import deepspeed  # noqa: F401  - imported by both strategies' runs, so the baseline is the same
    import lightning as L

    baseline_mib = current_rss_mib()
    data, module, trainer, resume = prepare(config)
    peaks = {}

    class TrainingPeak(L.Callback):  # before the run's final checkpoint save, which rank 0 alone does
        def on_train_end(self, trainer, module):
            peaks["training"] = peak_rss_mib()

    trainer.callbacks.append(TrainingPeak())
    fit(config, data, module, trainer, resume)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    report = {
        "rank": rank,
        "peak_rss_mib": peaks["training"],
        "training_mib": peaks["training"] - baseline_mib,
    }
    print(json.dumps({**report, "with_final_save_mib": peak_rss_mib()}), flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def memory(args) -> None:
    from worldmodel.data.sources.sample import prepare_sample
    from worldmodel.models.flops import tokenizer_parameters
    from worldmodel.models.presets import preset

    data = OUT / "sample"
    if not (data / "dataset.json").is_file():
        prepare_sample(data)
    print(
        f"model {args.model} ({tokenizer_parameters(preset(args.model)) / 1e6:.1f}M parameters), 2 CPU ranks"
    )
    for strategy in args.strategies.split(","):
        command = [
            sys.executable,
            __file__,
            "memory-rank",
            "--model",
            args.model,
            "--strategy",
            strategy,
            "--steps",
            str(args.steps),
            "--data",
            str(data),
            *(f"--override={override}" for override in args.override if strategy != "ddp"),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        ranks = [json.loads(line) for line in re.findall(r"^\{.*\}$", output, re.M)]
        peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
        added = ", ".join(f"{r['training_mib']:.0f}" for r in ranks)
        print(f"| {strategy} | peak RSS per rank: {peaks} MiB | added by training: {added} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "part", nargs="?", default="all", choices=("all", "step-time", "memory", "memory-rank")
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--data", default=None)
    parser.add_argument("--strategies", default="ddp,deepspeed_zero3,fsdp", help="memory: compared")
    parser.add_argument(
        "--override", action="append", default=[], help="memory: a Hydra override for the sharded runs"
    )
    args = parser.parse_args()
    if args.part in ("all", "step-time"):
        step_time(
            argparse.Namespace(
                **{**vars(args), "model": args.model or "tokenizer_s", "steps": args.steps or 30}
            )
        )
    if args.part in ("all", "memory"):
        memory(
            argparse.Namespace(
                **{**vars(args), "model": args.model or "tokenizer_m", "steps": args.steps or 3}
            )
        )
    if args.part == "memory-rank":
        memory_rank(args)


if __name__ == "__main__":
    main()
