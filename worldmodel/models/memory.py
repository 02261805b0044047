"""Per-GPU training memory of a dynamics model under DDP and ZeRO-1/2/3, before a job is submitted.

Model states follow the ZeRO paper's accounting for Adam. With DDP (and in fp32) every rank
holds fp32 weights, gradients and two moments: 4 + 4 + 8 bytes per parameter. DeepSpeed in
bf16 keeps bf16 weights and gradients and an fp32 master copy with the moments: 2 + 2 + 12.
ZeRO-1 shards the optimizer states over the GPUs, ZeRO-2 also the gradients, ZeRO-3 also the
weights.

Activations were measured, not guessed: the bytes autograd saves per token for one ST block are
a constant times the width (tests/test_memory.py re-measures them on the real module). With
activation checkpointing each block keeps only its fp32 input, and one block's activations
come back during its recomputation. The head adds its input and a few bytes per vocabulary
entry per token for the logits and the loss.
Not counted: the frozen tokenizer, CUDA context and allocator slack (about 1-3 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from worldmodel.models.dynamics import DynamicsConfig
from worldmodel.models.flops import dynamics_parameters

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
PRECISIONS = ("32-true", "bf16-mixed")

# Bytes autograd keeps per token, per unit of width, for one ST block (measured, see module doc).
# fp32: 112.7 for every shape tried; bf16 autocast: 66-74 depending on the attention kernel's
# sequence lengths (CPU fused attention), so the middle of that range.
BLOCK_ACTIVATION_BYTES = {"32-true": 112.7, "bf16-mixed": 70.0}
# Bytes per token per vocabulary entry for the logits and the cross-entropy.
LOGIT_BYTES = {"32-true": 4.0, "bf16-mixed": 4.25}
# Bytes per token per unit of width around the head: the final norm's fp32 input and its output.
HEAD_INPUT_BYTES = {"32-true": 8.0, "bf16-mixed": 7.0}
RESIDUAL_BYTES = 4.0  # the residual stream stays fp32 under autocast


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


def activation_bytes(config: DynamicsConfig, tokens: int, precision: str, checkpointing: bool) -> float:
    """Bytes saved for backward for `tokens` tokens (micro batch x frames x tokens per frame)."""
    block = BLOCK_ACTIVATION_BYTES[precision] * config.dim
    if checkpointing:
        per_token = config.depth * RESIDUAL_BYTES * config.dim + block  # inputs + one recomputed block
    else:
        per_token = config.depth * block
    head = HEAD_INPUT_BYTES[precision] * config.dim + LOGIT_BYTES[precision] * config.vocab_size
    return tokens * (per_token + head)


def training_memory(
    config: DynamicsConfig,
    tokens_per_sample: int,
    micro_batch: int,
    gpus: int,
    strategy: str,
    precision: str = "bf16-mixed",
    checkpointing: bool = False,
) -> MemoryEstimate:
    weights, gradients, optimizer = model_state_bytes(dynamics_parameters(config), strategy, precision, gpus)
    activations = activation_bytes(config, micro_batch * tokens_per_sample, precision, checkpointing)
    return MemoryEstimate(weights, gradients, optimizer, activations)
