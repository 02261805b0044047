import contextlib
import math

import pytest
import torch
import torch.nn.attention

from worldmodel.models.dynamics import HEAD_CHUNK_ROWS, Dynamics, DynamicsConfig
from worldmodel.models.flops import dynamics_parameters
from worldmodel.models.memory import (
    BLOCK_ACTIVATION_BYTES,
    CHUNK_LOGIT_BYTES,
    activation_bytes,
    model_state_bytes,
    training_memory,
)
from worldmodel.models.presets import preset


def measured_saved_bytes(config: DynamicsConfig, precision: str, tokens_shape) -> int:
    """Bytes autograd keeps for backward in one training loss (clean context) of the real module."""
    torch.manual_seed(0)
    model = Dynamics(config).train()
    tokens = torch.randint(0, config.vocab_size, tokens_shape)
    actions = torch.randint(0, config.num_actions, tokens_shape[:2])
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor):  # count each storage once: views of one buffer cost its bytes once
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in parameters:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    # The fused (flash) attention kernel, as on GPUs: it keeps no L x L attention matrix.
    flash = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast, flash:
        model.training_loss(tokens, actions, torch.Generator().manual_seed(0), clean_context=True)
    return total


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "dim, depth, heads, shape, conditioning",
    [(128, 4, 4, (2, 8, 8, 8), "token"), (96, 6, 3, (1, 12, 6, 5), "add")],
)
def test_activation_estimate_matches_what_autograd_saves(
    precision, checkpointing, dim, depth, heads, shape, conditioning, monkeypatch
):
    # As on GPUs: the fused kernel for every attention, short temporal ones too (on CPU those
    # run as plain matmuls).
    monkeypatch.setattr("worldmodel.models.layers.SHORT_SEQUENCE", 0)
    config = DynamicsConfig(
        vocab_size=4096,
        num_actions=4,
        dim=dim,
        depth=depth,
        heads=heads,
        checkpointing=checkpointing,
        action_conditioning=conditioning,
    )
    measured = measured_saved_bytes(config, precision, shape)
    clips, frames, height, width = shape
    estimate = activation_bytes(
        config,
        frames=frames,
        tokens_per_frame=height * width,
        clips=clips,
        precision=precision,
        checkpointing=checkpointing,
    )
    # Not saved by autograd, alive only in backward: the head's chunk of logits and, with
    # checkpointing, the block being recomputed. Taken out with the estimate's own formulas, so
    # this test checks neither (CHUNK_LOGIT_BYTES is checked against the GPU's measured peak,
    # benchmarks/gpu_scale.py).
    rows = min(clips * (frames - 1) * height * width * 2 / math.pi, HEAD_CHUNK_ROWS)
    estimate -= rows * CHUNK_LOGIT_BYTES * config.vocab_size
    if checkpointing:
        entries = clips * (2 * frames - 1) * (height * width + (conditioning == "token"))
        estimate -= entries * BLOCK_ACTIVATION_BYTES[precision] * config.dim
    assert estimate == pytest.approx(measured, rel=0.03 if precision == "32-true" else 0.08), (
        estimate,
        measured,
    )


def test_the_heads_memory_does_not_grow_with_the_vocabulary():
    """Chunked logits: what the loss saves is the same for a vocabulary of 512 and of 64000."""
    small, large = (
        DynamicsConfig(vocab_size=vocab, num_actions=4, dim=64, depth=2, heads=2) for vocab in (512, 64000)
    )
    assert measured_saved_bytes(small, "32-true", (1, 4, 8, 8)) == pytest.approx(
        measured_saved_bytes(large, "32-true", (1, 4, 8, 8)), rel=0.01
    )


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    n, gpus = 1_000_000, 8
    assert model_state_bytes(n, "ddp", "bf16-mixed", gpus) == (4e6, 4e6, 8e6)
    assert model_state_bytes(n, "zero1", "bf16-mixed", gpus) == (2e6, 2e6, 12e6 / 8)
    assert model_state_bytes(n, "zero2", "bf16-mixed", gpus) == (2e6, 2e6 / 8, 12e6 / 8)
    assert model_state_bytes(n, "zero3", "bf16-mixed", gpus) == (2e6 / 8, 2e6 / 8, 12e6 / 8)
    with pytest.raises(ValueError, match="strategy"):
        model_state_bytes(n, "zero4", "bf16-mixed", gpus)


def test_seven_billion_needs_zero3_and_checkpointing_on_eight_80gb_gpus():
    config = preset("dynamics_7b")
    config.vocab_size = 64_000
    # 16 frames of 16x16 tokens
    shape = {"frames": 16, "tokens_per_frame": 16 * 16, "micro_batch": 1, "gpus": 8, "checkpointing": True}
    ddp, zero3 = (training_memory(config, strategy=strategy, **shape) for strategy in ("ddp", "zero3"))
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * dynamics_parameters(config)
    assert ddp.total > 80e9 > zero3.total
