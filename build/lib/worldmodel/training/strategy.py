"""Strategies, applied from outside the model: DDP, DeepSpeed ZeRO 1/2/3 (+ offload), FSDP2.

Lightning's DeepSpeed strategy refuses anything but CUDA in `setup_environment`, while DeepSpeed
itself runs ZeRO on CPU processes over gloo. `WorldModelDeepSpeedStrategy` lifts that one check
on CPU, so the same engine runs in CI on two CPU processes and on GPU clusters. FSDP2 runs
through Lightning's `ModelParallelStrategy` (which runs on CPU over gloo as well) with a pure
data-parallel mesh; the modules shard their networks in `configure_model` (training/fsdp.py).
Both write their sharded checkpoint folders atomically.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy

from worldmodel.config import TrainConfig


class AtomicFolderSaves:
    """For strategies whose checkpoint is a folder of per-rank files: a save never leaves a
    half-written folder where a complete one was."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Every rank writes its shard into `<path>.partial`; rank 0 then swaps it into place
        through `<path>.previous`. Whatever an interrupted save left is cleared first."""
        target = Path(filepath)
        partial = target.with_name(target.name + ".partial")
        previous = target.with_name(target.name + ".previous")
        if self.is_global_zero:
            recover_interrupted_swap(target, partial, previous)
        self.barrier("checkpoint_clean")
        super().save_checkpoint(checkpoint, str(partial), storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            if target.exists():
                os.replace(target, previous)
            os.replace(partial, target)
            remove(previous)
        self.barrier("checkpoint_swapped")


class WorldModelDeepSpeedStrategy(AtomicFolderSaves, DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, runnable on CPU, with atomic checkpoint folders."""

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()
            return
        # Lightning checks device indices are 0..N-1 and hands root_device.index to DeepSpeed as
        # its device rank (plain "cpu" has index None): give each CPU process an indexed device.
        self.parallel_devices = [torch.device("cpu", index) for index in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # everything but the CUDA check

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """ZeRO-3 builds the network inside `deepspeed.zero.Init`, which creates the parameters in
        the training dtype; initialized there in bf16, ~0.15% of every weight's values came out
        other than the fp32 initialization rounded (some by the whole init range), so ZeRO-3 began
        from other weights than every other strategy. Drawn in fp32, it begins from the same
        (the weights of ZeRO-1/2, built in fp32, are untouched)."""
        with super().model_sharded_context(), initial_draws_in_fp32():
            yield


@contextmanager
def initial_draws_in_fp32() -> Iterator[None]:
    """Random initialization (`Tensor.uniform_`, `Tensor.normal_`, what nn.Linear, nn.Embedding
    and the convolutions use) of a half-precision tensor is drawn in fp32 and rounded into it:
    the same values as initializing in fp32 and casting, from the same random stream."""
    originals = {name: getattr(torch.Tensor, name) for name in ("uniform_", "normal_")}

    def in_fp32(draw):
        def drawn(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if tensor.dtype not in (torch.bfloat16, torch.float16):
                return draw(tensor, *args, **kwargs)
            # .float() rather than a factory: zero.Init's factories would make it bf16 again
            return tensor.copy_(draw(tensor.float(), *args, **kwargs))

        return drawn

    for name, draw in originals.items():
        setattr(torch.Tensor, name, in_fp32(draw))
    try:
        yield
    finally:
        for name, draw in originals.items():
            setattr(torch.Tensor, name, draw)


class WorldModelFSDPStrategy(AtomicFolderSaves, ModelParallelStrategy):
    """FSDP2 over every rank (data parallel only), with atomic checkpoint folders."""


def recover_interrupted_swap(target: Path, partial: Path, previous: Path) -> None:
    """Leftovers of a save cut short: `partial` is never complete (removed); `previous` is stale
    when `target` exists (removed), and the only complete copy when it does not (put back)."""
    remove(partial)
    if previous.exists():
        if target.exists():
            remove(previous)
        else:
            os.replace(previous, target)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def build_strategy(config: TrainConfig) -> Strategy | str:
    """The Lightning strategy for `config.strategy` on `config.trainer`'s hardware."""
    choice, trainer = config.strategy, config.trainer
    backend = "gloo" if trainer.accelerator == "cpu" else "nccl"
    if choice.name == "ddp":
        return DDPStrategy(process_group_backend=backend) if trainer.world_size > 1 else "auto"
    if choice.name == "deepspeed":
        strategy = WorldModelDeepSpeedStrategy(
            stage=choice.zero_stage,
            offload_optimizer=choice.offload_optimizer,
            offload_parameters=choice.offload_parameters,
            reduce_bucket_size=choice.bucket_elements,
            allgather_bucket_size=choice.bucket_elements,
            sub_group_size=choice.sub_group_elements,
            process_group_backend=backend,
        )
        # Not a constructor argument in Lightning: set in the ZeRO config it built.
        zero = strategy.config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = choice.persistence_threshold
        zero["stage3_max_live_parameters"] = choice.live_parameters
        zero["stage3_max_reuse_distance"] = choice.reuse_distance
        return strategy
    # Activation checkpointing stays the model's own (model.checkpointing, layers.py).
    return WorldModelFSDPStrategy(
        data_parallel_size=trainer.world_size, tensor_parallel_size=1, process_group_backend=backend
    )
