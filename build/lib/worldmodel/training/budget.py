"""Compute budgets for scaling runs, and the summary every run leaves for `worldmodel scaling`.

A run's size: N = parameters of the trained network, FLOPs per token (worldmodel.models.flops,
forward + backward), tokens per optimizer step = global batch x frames x tokens per frame.
`scaling.budget` fixes the number of steps from that size:
  tokens_per_parameter: steps = ceil(k * N / tokens per step)
  flops:                steps = ceil(C / (FLOPs per token * tokens per step))
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from worldmodel.config import ConfigError, TrainConfig

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class RunSize:
    parameters: int
    flops_per_token: float
    tokens_per_step: int


def run_size(config: TrainConfig, module, index: dict | None) -> RunSize:
    """Size of a run of `module` on clips described by dataset.json's `index`."""
    if index is None:
        raise ConfigError("scaling.budget: needs data.root (its dataset.json gives the clip size)")
    clip = torch.empty(1, config.data.frames, index["height"], index["width"], 3, device="meta")
    frames, tokens_per_frame = module.token_grid(clip)
    return RunSize(
        parameters=module.parameter_count(),
        flops_per_token=module.flops_per_token(clip),
        tokens_per_step=config.data.global_batch_size * frames * tokens_per_frame,
    )


def budget_steps(config: TrainConfig, size: RunSize) -> int:
    """Optimizer steps that spend the configured budget on a model of this size."""
    scaling = config.scaling
    if scaling.budget == "tokens_per_parameter":
        tokens = scaling.tokens_per_parameter * size.parameters
    else:
        tokens = scaling.flops / size.flops_per_token
    return max(1, math.ceil(tokens / size.tokens_per_step))


def write_summary(run_dir: str | os.PathLike, config: TrainConfig, size: RunSize, steps: int, losses: dict):
    """`run_dir/summary.json`: size, compute spent and final losses, written atomically."""
    tokens = steps * size.tokens_per_step
    summary = {
        "stage": config.task.stage,
        "preset": config.model.preset,
        "parameters": size.parameters,
        "flops_per_token": size.flops_per_token,
        "tokens_per_step": size.tokens_per_step,
        "steps": steps,
        "tokens": tokens,
        "flops": size.flops_per_token * tokens,
        "budget": config.scaling.budget,
        **{name: float(value) for name, value in losses.items()},
    }
    path = Path(run_dir) / SUMMARY_NAME
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    partial.replace(path)
    return summary
