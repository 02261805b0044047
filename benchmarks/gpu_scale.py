"""One GPU at real sizes: MFU and tokens/s of the dynamics presets at the largest micro-batch that
fits, peak memory against `worldmodel info`'s estimate, the tokenizer's encode rate and the
loader's rate against what a training step consumes (part of benchmarks/gpu_check.sh).

    python benchmarks/gpu_scale.py OUT_DIR            # on a GPU
    python benchmarks/gpu_scale.py OUT_DIR --tiny     # on the CPU, tiny sizes (the tests)

Training steps are the dynamics stage's own (`Dynamics.training_loss` with clean context, bf16
autocast, AdamW fused on CUDA, clipping) in a bare loop, on random tokens: 16 frames of 16x16
tokens. The largest micro-batch is found by doubling until the GPU runs out of memory. Writes
OUT_DIR/gpu_scale.json and prints a Markdown table.
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
from worldmodel.models.memory import training_memory  # noqa: E402
from worldmodel.models.presets import preset  # noqa: E402
from worldmodel.models.tokenizer import Tokenizer  # noqa: E402
from worldmodel.training.callbacks import peak_flops  # noqa: E402


def train_steps(config, batch: int, frames: int, grid: int, steps: int, device: torch.device) -> dict:
    """Seconds per training step after one warm-up step, and the peak memory allocated."""
    torch.manual_seed(0)
    model = Dynamics(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
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


def largest_batch(config, frames: int, grid: int, device: torch.device, cap: int) -> int:
    """The largest power-of-two micro-batch (up to `cap`) whose training step fits."""
    fits, batch = 0, 1
    while batch <= cap:
        try:
            train_steps(config, batch, frames, grid, 1, device)
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fits, batch = batch, batch * 2
    return fits


def dynamics_rows(sizes, frames, grid, device, steps, cap, vocab) -> list[dict]:
    rows = []
    peak = peak_flops(device) or float("nan")  # an unknown GPU: MFU not a number
    for name in sizes:
        config = replace(preset(name), vocab_size=vocab, num_actions=18)
        batch = largest_batch(config, frames, grid, device, cap)
        if not batch:
            rows.append({"model": name, "micro_batch": 0})
            continue
        measured = train_steps(config, batch, frames, grid, steps, device)
        tokens = batch * frames * grid * grid
        tokens_per_s = tokens / measured["seconds_per_step"]
        flops = dynamics_flops_per_token(config, frames, grid * grid, clean_context=True)
        estimate = training_memory(config, frames * grid * grid, batch, 1, "ddp", "bf16-mixed").total
        rows.append(
            {
                "model": name,
                "parameters": dynamics_parameters(config),
                "micro_batch": batch,
                "tokens_per_s": tokens_per_s,
                "clips_per_s": batch / measured["seconds_per_step"],
                "mfu": flops * tokens_per_s / peak,
                "peak_memory_bytes": measured["peak_memory_bytes"],
                "estimated_memory_bytes": estimate,
            }
        )
    return rows


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
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        sizes, frames, grid, steps, cap, vocab = ("dynamics_debug",), 4, 4, 2, 4, 1000
        encode = ("tokenizer_debug", 32, 4, 2)
    else:
        sizes, frames, grid, steps, cap, vocab = (
            ("dynamics_s", "dynamics_m", "dynamics_l"),
            16,
            16,
            5,
            256,
            64000,
        )
        encode = ("tokenizer_m", 128, 16, 8)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["dynamics"] = dynamics_rows(sizes, frames, grid, device, steps, cap, vocab)
    result["tokenizer_encode_clips_per_s"] = {encode[0]: encode_clips_per_s(*encode, device)}
    if args.data:
        result["loader_clips_per_s"] = {"workers_8": loader_clips_per_s(Path(args.data), 8, frames, 10)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"## Sizes ({result['device']}; {frames} frames of {grid}x{grid} tokens, bf16, largest micro-batch)\n"
    )
    print("| model | micro-batch | tokens/s | clips/s | MFU | peak memory | estimate (worldmodel info) |")
    print("|---|---|---|---|---|---|---|")
    for row in result["dynamics"]:
        if not row["micro_batch"]:
            print(f"| {row['model']} | does not fit | | | | | |")
            continue
        peak = row["peak_memory_bytes"]
        shown = f"{peak / 1e9:.2f} GB ({peak / row['estimated_memory_bytes']:.2f}x)" if peak else "n/a"
        print(
            f"| {row['model']} | {row['micro_batch']} | {row['tokens_per_s']:.0f} | {row['clips_per_s']:.1f} "
            f"| {row['mfu']:.1%} | {shown} | {row['estimated_memory_bytes'] / 1e9:.2f} GB |"
        )
    print(f"\ntokenizer encode: {result['tokenizer_encode_clips_per_s']}")
    if "loader_clips_per_s" in result:
        print(f"loader: {result['loader_clips_per_s']} (against the clips/s above)")


if __name__ == "__main__":
    main()
