"""One GPU at real sizes: MFU and tokens/s of the dynamics presets at the largest micro-batch that
fits, peak memory against `worldmodel info`'s estimate, the tokenizer's encode rate and the
loader's rate against what a training step consumes (part of benchmarks/gpu_check.sh).

    python benchmarks/gpu_scale.py OUT_DIR            # on a GPU
    python benchmarks/gpu_scale.py OUT_DIR --tiny     # on the CPU, tiny sizes (the tests)

Training steps are the dynamics stage's own (`Dynamics.training_loss` with clean context, bf16
autocast, AdamW fused on CUDA, clipping) in a bare loop, on random tokens: 16 frames of 16x16
tokens. The largest micro-batch is found by doubling until the GPU runs out of memory or a step
takes 1.5 s (the GPU is saturated long before). Writes OUT_DIR/gpu_scale.json and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generation import synchronize  # noqa: E402
from worldmodel.models.dynamics import Dynamics  # noqa: E402
from worldmodel.models.flops import dynamics_flops_per_token, dynamics_parameters  # noqa: E402
from worldmodel.models.layers import STBlock  # noqa: E402
from worldmodel.models.memory import training_memory  # noqa: E402
from worldmodel.models.presets import preset  # noqa: E402
from worldmodel.models.tokenizer import Tokenizer  # noqa: E402
from worldmodel.training.callbacks import peak_flops  # noqa: E402


def train_steps(model, optimizer, config, batch: int, frames: int, grid: int, steps: int) -> dict:
    """Seconds per training step after one warm-up step, and the peak memory allocated."""
    device = next(model.parameters()).device
    tokens = torch.randint(0, config.vocab_size, (batch, frames, grid, grid), device=device)
    actions = torch.randint(0, config.num_actions, (batch, frames), device=device)
    generator = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 1):
        if step == 1:  # the first step allocates and tunes kernels: not timed
            synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model.training_loss(tokens, actions, generator, clean_context=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds_per_step": seconds, "peak_memory_bytes": peak}


def largest_batch(model, optimizer, config, frames: int, grid: int, cap: int, long_step: float) -> int:
    """The largest power-of-two micro-batch (up to `cap`) whose training step fits, or the first whose
    step takes `long_step` seconds: by then the GPU is saturated and larger batches only cost time."""
    fits, batch = 0, 1
    while batch <= cap:
        try:
            seconds = train_steps(model, optimizer, config, batch, frames, grid, 1)["seconds_per_step"]
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)  # the failed step's gradients
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        fits, batch = batch, batch * 2
        if seconds > long_step:
            break
    return fits


def dynamics_row(name, frames, grid, device, steps, cap, vocab, long_step, compile_blocks, profile) -> dict:
    """One preset at its largest micro-batch: eager, then (with `compile_blocks`) each ST block
    compiled as `trainer.compile` does; peak memory (eager) against `worldmodel info`'s estimate.
    With `profile`, the last run's kernels by their own time (`row["profile"]`, a table)."""
    config = replace(preset(name), vocab_size=vocab, num_actions=18)
    torch.manual_seed(0)
    with device:  # built where it trains: initializing 0.5B parameters on the host takes longer
        model = Dynamics(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = largest_batch(model, optimizer, config, frames, grid, cap, long_step)
    if not batch:
        return {"model": name, "micro_batch": 0}
    peak = peak_flops(device) or float("nan")  # an unknown GPU: MFU not a number
    flops = dynamics_flops_per_token(config, frames, grid * grid, clean_context=True)
    tokens = batch * frames * grid * grid
    row = {
        "model": name,
        "parameters": dynamics_parameters(config),
        "micro_batch": batch,
        "estimated_memory_bytes": training_memory(
            config, frames=frames, tokens_per_frame=grid * grid, micro_batch=batch, gpus=1, strategy="ddp"
        ).total,
    }
    runs = {"eager": False, "compiled": True} if compile_blocks else {"eager": False}
    for run, compiled in runs.items():
        if compiled:
            for block in model.modules():
                if isinstance(block, STBlock):
                    block.compile()
        measured = train_steps(model, optimizer, config, batch, frames, grid, steps)
        tokens_per_s = tokens / measured["seconds_per_step"]
        row[run] = {
            "tokens_per_s": tokens_per_s,
            "clips_per_s": batch / measured["seconds_per_step"],
            "mfu": flops * tokens_per_s / peak,
            "peak_memory_bytes": measured["peak_memory_bytes"],
        }
    if profile:
        row["profile"] = profiled_step(model, optimizer, config, batch, frames, grid)
    return row


def profiled_step(model, optimizer, config, batch: int, frames: int, grid: int) -> str:
    """Where a training step's time goes: the operators of two steps by their own device time."""
    device = next(model.parameters()).device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        train_steps(model, optimizer, config, batch, frames, grid, 1)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=25)


def print_row(row: dict) -> None:
    if not row["micro_batch"]:
        print(f"| {row['model']} | does not fit | | | | |", flush=True)
        return
    cells = [row["model"], str(row["micro_batch"])]
    for run in ("eager", "compiled"):
        measured = row.get(run)
        cells.append(f"{measured['tokens_per_s']:.0f} ({measured['mfu']:.1%})" if measured else "not run")
    peak, estimate = row["eager"]["peak_memory_bytes"], row["estimated_memory_bytes"]
    cells.append(f"{peak / 1e9:.2f} GB ({peak / estimate:.2f}x)" if peak else "n/a")
    cells.append(f"{estimate / 1e9:.2f} GB")
    print(f"| {' | '.join(cells)} |", flush=True)


@torch.no_grad()
def encode_clips_per_s(name: str, size: int, frames: int, batch: int, device: torch.device) -> float:
    """Clips/s of the frozen tokenizer's encode (fp32, as the dynamics stage runs it)."""
    tokenizer = Tokenizer(preset(name)).to(device).eval()
    video = torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, device=device)
    tokenizer.encode(video)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        tokenizer.encode(video)
    synchronize(device)
    return repeats * batch / (time.perf_counter() - started)


def loader_clips_per_s(data: Path, workers: int, frames: int, batches: int) -> float:
    """Clips/s the streaming loader delivers (decoding with decord in `workers` processes)."""
    from worldmodel.data.pipeline import ClipLoader, ClipSpec, ClipStream
    from worldmodel.data.shards import shard_paths

    stream = ClipStream(shard_paths(data, "train"), ClipSpec(frames, 1), batch_size=8, train=True, seed=0)
    loader = iter(ClipLoader(stream, num_workers=workers))
    next(loader)  # workers start
    started, clips = time.perf_counter(), 0
    for _ in range(batches):
        clips += len(next(loader)["video"])
    return clips / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out")
    parser.add_argument("--data", default=None, help="a prepared folder for the loader (skipped without)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--sizes", default="dynamics_s,dynamics_m,dynamics_l", help="dynamics presets")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--profile", default="", help="a preset whose step is profiled (after its runs)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as training on a GPU: the fp32 logits in TF32
    if args.tiny:
        sizes, frames, grid, steps, cap, vocab, long_step = ("dynamics_debug",), 4, 4, 2, 4, 1000, 60.0
        encode = ("tokenizer_debug", 32, 4, 2)
    else:
        sizes, frames, grid, steps, cap, vocab, long_step = (
            tuple(args.sizes.split(",")),
            16,
            16,
            5,
            256,
            64000,
            1.5,
        )
        encode = ("tokenizer_m", 128, 16, 8)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    title = f"{frames} frames of {grid}x{grid} tokens, bf16, largest micro-batch"
    print(
        f"## Sizes ({result['device']}; {title})\n\n"
        "| model | micro-batch | tokens/s (MFU), eager | tokens/s (MFU), compiled | peak memory, eager "
        "| estimate (worldmodel info) |\n|---|---|---|---|---|---|",
        flush=True,
    )
    result["dynamics"], profiles = [], {}
    for name in sizes:
        compiled, profiled = not args.no_compile, name == args.profile
        row = dynamics_row(name, frames, grid, device, steps, cap, vocab, long_step, compiled, profiled)
        print_row(row)
        if (table := row.pop("profile", None)) is not None:  # none where no micro-batch fit
            profiles[name] = table
        result["dynamics"].append(row)
    for name, table in profiles.items():
        print(f"\n### Profile of one {name} step (two steps, by own device time)\n\n```\n{table}\n```")
    result["tokenizer_encode_clips_per_s"] = {encode[0]: encode_clips_per_s(*encode, device)}
    print(f"\ntokenizer encode: {result['tokenizer_encode_clips_per_s']}")
    if args.data:
        result["loader_clips_per_s"] = {"workers_8": loader_clips_per_s(Path(args.data), 8, frames, 10)}
        print(f"loader: {result['loader_clips_per_s']} (against the clips/s above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
