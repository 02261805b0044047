"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for both stages, as torchtitan applies it.

The network is built on the meta device (no rank ever holds the whole fp32 model), each ST block
and then the root become FSDP units sharded over the data-parallel mesh, and only then are the
weights materialized, each rank its shard. Initialization reproduces what building the network on
a device would give under the same seed: modules are reset one at a time in the order they were
constructed, on one full-size parameter at a time, and each rank keeps its slice, so a run under
FSDP starts from the weights of the same run under DDP.

The stages call their networks through methods other than `forward` (`training_loss`,
`generate`, `encode`, `decode`); FSDP unshards the root's parameters only around the calls it
knows about, so those methods are registered with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from worldmodel.models.layers import STBlock

# What the stages call on their networks besides forward (those a network lacks are skipped).
ENTRY_METHODS = ("training_loss", "generate", "encode", "decode")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_sharded(
    build: Callable[[], nn.Module],
    mesh: DeviceMesh,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """`build()` on the meta device, sharded per ST block and at the root, then initialized.

    `param_dtype`: the dtype parameters are gathered in for compute (None: as stored, fp32);
    gradients are reduced across ranks in `reduce_dtype`."""
    net, constants = build_on_meta(build)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in net.modules():
        if isinstance(block, STBlock):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    for method in ENTRY_METHODS:
        if callable(getattr(net, method, None)):
            register_fsdp_forward_method(net, method)
    materialize(net, constants, device)
    return net


def build_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """`build()` with parameters on the meta device (no memory), and the buffers it made on a
    real device anyway (constants such as FSQ's levels), which materializing would wipe."""
    with torch.device("meta"):
        net = build()
    return net, {name: buffer for name, buffer in net.named_buffers() if not buffer.is_meta}


@torch.no_grad()
def materialize(net: nn.Module, constants: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a meta-built (possibly sharded) network real storage on `device` and its initial values."""
    net.to_empty(device=device)
    for name, value in constants.items():
        owner, _, attribute = name.rpartition(".")
        getattr(net.get_submodule(owner), attribute).copy_(value)
    initialize_as_constructed(net)


@torch.no_grad()
def initialize_as_constructed(net: nn.Module) -> None:
    """Draw every parameter as constructing `net` under the current RNG state would have.

    Modules are reset in registration order (the order the constructors ran in, which the test of
    this function checks for each network), each on full-size plain CPU tensors that are then
    sliced into the rank's shard. Modules that set their own initial values after their children's
    (`reset_parameters_after_children`) do so last."""
    for module in net.modules():
        own = dict(module.named_parameters(recurse=False))
        reset = getattr(module, "reset_parameters", None)
        if not own or not callable(reset):
            continue
        # On the CPU, whatever the device: values drawn from the CPU generator, as a normal build
        # (on the CPU, then moved) draws them.
        full = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for name, p in own.items()}
        module._parameters.update(full)  # reset draws into the full tensors
        reset()
        module._parameters.update(own)
        for name, parameter in own.items():
            _assign(parameter, full[name].data)
    for module in net.modules():
        after = getattr(module, "reset_parameters_after_children", None)
        if callable(after):
            after()


def _local(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.to_local() if isinstance(parameter, DTensor) else parameter


def _assign(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size value into a parameter: its shard of it, for a sharded one."""
    full = full.to(_local(parameter).device)
    if isinstance(parameter, DTensor):
        # every rank drew the same full value (same seed): each keeps its slice, nothing is sent
        full = distribute_tensor(
            full, parameter.device_mesh, parameter.placements, src_data_rank=None
        ).to_local()
    _local(parameter).copy_(full)
