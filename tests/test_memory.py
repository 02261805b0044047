import contextlib

import pytest
import torch
import torch.nn.attention

from worldmodel.models.dynamics import Dynamics, DynamicsConfig
from worldmodel.models.flops import dynamics_parameters
from worldmodel.models.memory import (
    BLOCK_ACTIVATION_BYTES,
    activation_bytes,
    model_state_bytes,
    training_memory,
)
from worldmodel.models.presets import preset


def measured_saved_bytes(
    config: DynamicsConfig, precision: str, tokens_shape=(2, 8, 8, 8)
) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one forward + loss of the real module, and the token count."""
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
        logits = model(tokens, actions)
        torch.nn.functional.cross_entropy(logits.flatten(0, 3).float(), tokens.flatten())
    return total, tokens.numel()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dim, depth, heads, shape", [(128, 4, 4, (2, 8, 8, 8)), (96, 6, 3, (1, 12, 6, 5))])
def test_activation_estimate_matches_what_autograd_saves(
    precision, checkpointing, dim, depth, heads, shape, monkeypatch
):
    # As on GPUs: the fused kernel for every attention, short temporal ones too (on CPU those
    # run as plain matmuls). The estimate counts grid tokens; "token" conditioning's one extra
    # token per frame (0.4% at 16x16 tokens) is left out, so the summed action is measured here.
    monkeypatch.setattr("worldmodel.models.layers.SHORT_SEQUENCE", 0)
    config = DynamicsConfig(
        vocab_size=512,
        num_actions=4,
        dim=dim,
        depth=depth,
        heads=heads,
        checkpointing=checkpointing,
        action_conditioning="add",
    )
    measured, tokens = measured_saved_bytes(config, precision, shape)
    estimate = activation_bytes(config, tokens, precision, checkpointing)
    if checkpointing:  # the recomputed block lives only during backward, not after the forward
        estimate -= tokens * BLOCK_ACTIVATION_BYTES[precision] * config.dim
    assert estimate == pytest.approx(measured, rel=0.03 if precision == "32-true" else 0.08), (
        estimate / tokens,
        measured / tokens,
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
    tokens = 16 * 16 * 16  # 16 frames of 16x16 tokens
    ddp = training_memory(config, tokens, 1, 8, "ddp", checkpointing=True)
    zero3 = training_memory(config, tokens, 1, 8, "zero3", checkpointing=True)
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * dynamics_parameters(config)
    assert ddp.total > 80e9 > zero3.total
