"""Per-GPU training memory of a dynamics model under DDP and ZeRO-1/2/3, before a job is submitted.

Model states follow the ZeRO paper's accounting for Adam. With DDP (and in fp32) every rank
holds fp32 weights, gradients and two moments: 4 + 4 + 8 bytes per parameter. DeepSpeed in
bf16 keeps bf16 weights and gradients and an fp32 master copy with the moments: 2 + 2 + 12.
ZeRO-1 shards the optimizer states over the GPUs, ZeRO-2 also the gradients, ZeRO-3 also the
weights.

Activations were measured, not guessed: the bytes autograd saves per token for one ST block are
a constant times the width (tests/test_memory.py re-measures them on the real module's training
loss). They count frame entries as training runs them: with clean context (teacher forcing)
2T - 1 entries of T frames, each with its action token under "token" conditioning. With
activation checkpointing each block keeps only its fp32 input, and one block's activations
come back during its recomputation. The head keeps the final norm's fp32 input and the hidden
states of the masked rows (frames 1..T-1, 2/pi of each on average); their logits are computed
HEAD_CHUNK_ROWS rows at a time and recomputed in backward, so one chunk's logits, log-softmax
and gradient (12 bytes per vocabulary entry per row) are alive at once.
Not counted: the frozen tokenizer, CUDA context and allocator slack (about 1-3 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worldmodel.models.dynamics import HEAD_CHUNK_ROWS, DynamicsConfig
from worldmodel.models.flops import dynamics_parameters

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
PRECISIONS = ("32-true", "bf16-mixed")

# Bytes autograd keeps per token, per unit of width, for one ST block (measured, see module doc).
# fp32: 112.7 for every shape tried; bf16 autocast: 64-72 depending on the attention kernel's
# sequence lengths (CPU fused attention), so the middle of that range.
BLOCK_ACTIVATION_BYTES = {"32-true": 112.7, "bf16-mixed": 68.0}
# Per token and unit of width: the residual stream and the final norm's input, fp32 under autocast.
RESIDUAL_BYTES = 4.0
# Per masked row and unit of width: the final norm's output gathered at the rows the head scores.
HEAD_ROW_BYTES = 4.0
CHUNK_LOGIT_BYTES = 12.0  # per row and vocabulary entry: fp32 logits, log-softmax and gradient


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def model_state_bytes(
    parameters: int, strategy: str, precision: str, gpus: int
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for Adam."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    deepspeed_bf16 = strategy != "ddp" and precision == "bf16-mixed"
    weights, gradients, optimizer = (2.0, 2.0, 12.0) if deepspeed_bf16 else (4.0, 4.0, 8.0)
    stage = STRATEGIES.index(strategy)  # 0 = nothing sharded ... 3 = everything sharded
    return (
        parameters * weights / (gpus if stage >= 3 else 1),
        parameters * gradients / (gpus if stage >= 2 else 1),
        parameters * optimizer / (gpus if stage >= 1 else 1),
    )


def activation_bytes(
    config: DynamicsConfig,
    *,
    frames: int,
    tokens_per_frame: int,
    clips: int,
    precision: str,
    checkpointing: bool,
    clean_context: bool = True,
) -> float:
    """Bytes alive for backward when `clips` clips of `frames` frames of `tokens_per_frame` tokens
    have run forward: what autograd saves, plus one chunk of the head's logits."""
    entries = (2 * frames - 1 if clean_context else frames) * (
        tokens_per_frame + (config.action_conditioning == "token")
    )
    block = BLOCK_ACTIVATION_BYTES[precision] * config.dim
    if checkpointing:
        per_entry = config.depth * RESIDUAL_BYTES * config.dim + block  # inputs + one recomputed block
    else:
        per_entry = config.depth * block
    per_entry += RESIDUAL_BYTES * config.dim  # the final norm's input
    rows = (frames - 1) * tokens_per_frame * 2 / math.pi  # masked, so scored: the expected number
    head_chunk = min(clips * rows, HEAD_CHUNK_ROWS) * CHUNK_LOGIT_BYTES * config.vocab_size
    return clips * (entries * per_entry + rows * HEAD_ROW_BYTES * config.dim) + head_chunk


def training_memory(
    config: DynamicsConfig,
    *,
    frames: int,
    tokens_per_frame: int,
    micro_batch: int,
    gpus: int,
    strategy: str,
    precision: str = "bf16-mixed",
    checkpointing: bool = False,
    clean_context: bool = True,
) -> MemoryEstimate:
    weights, gradients, optimizer = model_state_bytes(dynamics_parameters(config), strategy, precision, gpus)
    activations = activation_bytes(
        config,
        frames=frames,
        tokens_per_frame=tokens_per_frame,
        clips=micro_batch,
        precision=precision,
        checkpointing=checkpointing,
        clean_context=clean_context,
    )
    return MemoryEstimate(weights, gradients, optimizer, activations)
