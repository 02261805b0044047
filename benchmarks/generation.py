"""Rollout speed with and without the KV cache, on the same model, clips and settings.

    python benchmarks/generation.py                         # dynamics_xs, 8 clips, 7 past frames
    python benchmarks/generation.py --model dynamics_s --frames 4

Both paths give the same tokens (tests/test_dynamics.py checks it); this measures what the cache
saves: without it, every MaskGIT step of every new frame recomputes all past frames in the window;
with it, past frames' temporal keys and values are computed once and each step runs the new frame
alone. Frames/s = new frames generated per second, summed over the clips of the batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worldmodel.models.dynamics import Dynamics  # noqa: E402
from worldmodel.models.presets import preset  # noqa: E402


def frames_per_second(model: Dynamics, context, actions, frames: int, steps: int, window: int, cached: bool):
    model.generate(
        context, actions, 1, steps=steps, temperature=0, window=window, use_cache=cached
    )  # warm-up
    synchronize(context.device)
    started = time.perf_counter()
    model.generate(context, actions, frames, steps=steps, temperature=0, window=window, use_cache=cached)
    synchronize(context.device)
    return context.shape[0] * frames / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dynamics_xs")
    parser.add_argument("--vocab", type=int, default=1000, help="tokenizer_debug's vocabulary")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--context", type=int, default=4, help="real frames given")
    parser.add_argument("--frames", type=int, default=8, help="frames generated")
    parser.add_argument("--window", type=int, default=8, help="frames attended (the training clip length)")
    parser.add_argument("--steps", type=int, default=4, help="MaskGIT steps per frame")
    parser.add_argument("--grid", type=int, default=16, help="tokens per side (64x64 frames, x4 tokenizer)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = replace(preset(args.model), vocab_size=args.vocab, num_actions=18)
    model = Dynamics(config).to(device).eval()
    context = torch.randint(0, args.vocab, (args.clips, args.context, args.grid, args.grid), device=device)
    actions = torch.randint(0, 18, (args.clips, args.context + args.frames), device=device)
    speeds = {
        cached: frames_per_second(model, context, actions, args.frames, args.steps, args.window, cached)
        for cached in (False, True)
    }
    print(
        f"{args.model}, {args.clips} clips, {args.context} context + {args.frames} new frames, window "
        f"{args.window}, {args.steps} MaskGIT steps, {args.grid}x{args.grid} tokens, "
        f"{torch.get_num_threads()} threads, {device}"
    )
    print("| path | frames/s | speed-up |\n|---|---|---|")
    print(f"| without cache | {speeds[False]:.1f} | 1.00x |")
    print(f"| KV cache | {speeds[True]:.1f} | {speeds[True] / speeds[False]:.2f}x |")


if __name__ == "__main__":
    main()
