"""LightningModules for both stages, sharing one training path.

`WorldModelModule` owns everything the stages share: the optimizer (AdamW with weight-decay
groups, fused on CUDA, DeepSpeedCPUAdam when DeepSpeed offloads it), warmup + cosine schedule,
logging of loss, learning rate and gradient norm, and the resolved config in every checkpoint.
A stage only says how a batch becomes a loss (`compute_loss`) and what a video of its work
looks like (`preview`). The EMA of the weights is the `EMA` callback.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from worldmodel.config import TrainConfig
from worldmodel.data import NULL_ACTION
from worldmodel.models.dynamics import Dynamics, DynamicsConfig
from worldmodel.models.flops import (
    dynamics_flops_per_token,
    dynamics_parameters,
    lam_flops_per_token,
    lam_parameters,
    tokenizer_flops_per_token,
    tokenizer_parameters,
)
from worldmodel.models.lam import (
    LatentActionConfig,
    LatentActionModel,
    conditioning_from_latent,
    latent_conditioning,
)
from worldmodel.models.layers import STBlock
from worldmodel.models.presets import preset
from worldmodel.models.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.training.checkpoint import CheckpointError


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of Linear/Conv layers only; norms, biases, embeddings are not decayed."""
    decayed, plain = [], []
    for submodule in module.modules():
        for name, parameter in submodule.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            matrix = name == "weight" and isinstance(submodule, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)
            (decayed if matrix else plain).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def fused_adamw(device_type: str, precision: str, grad_clip: float | None) -> bool:
    """Whether AdamW runs fused (one kernel for all parameters): on CUDA, except under fp16 mixed
    precision with clipping, where the loss scaler must unscale the gradients before they are
    clipped and a fused step unscales them itself."""
    return device_type == "cuda" and not (precision.startswith("16") and bool(grad_clip))


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def labelled(keys: list[str], share: float) -> list[bool]:
    """Which clips lend their recorded actions to a latent action model: those whose key hashes
    into the first `share` of the range, so the same clips every epoch and on every rank."""
    return [zlib.crc32(key.encode()) < share * 2**32 for key in keys]


class WorldModelModule(L.LightningModule):
    """The shared training path; subclasses define `net`, `compute_loss` and `preview`."""

    def __init__(self, config: TrainConfig, net_config):
        """`net_config`: the architecture (a resumed checkpoint's or today's preset); activation
        checkpointing is a training choice, not architecture, so today's config sets it."""
        super().__init__()
        net_config.checkpointing = config.model.checkpointing
        self.config = config
        self.net_config = net_config
        self.net: nn.Module | None = None  # built in configure_model
        self.save_hyperparameters({"config": asdict(config)})

    # -- what a stage defines -------------------------------------------------------------
    def build_net(self) -> nn.Module:
        raise NotImplementedError

    def compute_loss(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def preview(self, batch: dict) -> torch.Tensor:
        """uint8 video (T, H, W, 3) showing the model at work on the first clip of `batch`."""
        raise NotImplementedError

    def flops_per_token(self, video: torch.Tensor) -> float:
        """Training FLOPs per token for clips shaped like `video` (B, T, H, W, 3)."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        """Parameters of the trained network, from its architecture (worldmodel.models.flops)."""
        raise NotImplementedError

    def token_grid(self, video: torch.Tensor) -> tuple[int, int]:
        """(frames, tokens per frame) of clips shaped like `video`."""
        frames, height, width = video.shape[1:4]
        downsample = self.tokenizer_config.downsample
        return frames, (height // downsample) * (width // downsample)

    def video_like(self, batch: dict) -> torch.Tensor:
        """The batch's video; for a batch of tokens, an empty (meta) tensor shaped like the video
        they encode, for what is computed from clip shapes (FLOPs, tokens per step)."""
        if "video" in batch:
            return batch["video"]
        batch_size, frames, height, width = batch["tokens"].shape
        downsample = self.tokenizer_config.downsample
        return torch.empty(batch_size, frames, height * downsample, width * downsample, 3, device="meta")

    # -- the shared path -------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the network here, not in __init__: under ZeRO-3 Lightning calls this inside
        deepspeed.zero.Init, and under FSDP the network is built on the meta device and sharded
        before its weights exist, so each rank only ever holds its shard of the weights."""
        if self.net is not None:  # Lightning may call this more than once
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        # The initial weights are a function of the seed alone, not of what drew from the RNG
        # before (strategies re-seed at different points): every strategy and device count
        # starts from the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            if not isinstance(strategy, ModelParallelStrategy):
                self.net = self.compiled(self.build_net())
                return
            from worldmodel.training.fsdp import DTYPES, build_sharded

            bf16 = self.config.trainer.precision.startswith("bf16")
            self.net = build_sharded(
                lambda: self.compiled(self.build_net()),
                strategy.device_mesh["data_parallel"],
                strategy.root_device,
                param_dtype=torch.bfloat16 if bf16 else None,
                reduce_dtype=DTYPES[self.config.strategy.reduce_dtype],
            )

    def compiled(self, net: nn.Module) -> nn.Module:
        """With trainer.compile, regional compilation: each ST block once (they are alike, so one
        graph serves all), in place, so state-dict keys stay the same."""
        if self.config.trainer.compile:
            for block in net.modules():
                if isinstance(block, STBlock):
                    block.compile()
        return net

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Randomness of one training step, a function of (seed, epoch, batch, rank): resumable."""
        key = f"{self.config.seed}-{self.current_epoch}-{batch_idx}-{self.global_rank}".encode()
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(key))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch, self.step_generator(batch_idx))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in metrics.items()})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, metrics = self.compute_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["actions"]))
        self.log_dict(
            {f"val/{name}": value for name, value in metrics.items()},
            sync_dist=True,
            batch_size=len(batch["actions"]),
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the network's resolved architecture (loads rebuild from it, not from today's
        presets) and what it was trained on, so evaluation can refuse data it cannot read. A
        state with non-finite weights is never written."""
        bad = [name for name, parameter in self.net.named_parameters() if not _finite(parameter.detach())]
        # every rank checks its shard of sharded weights; all refuse together, none waits
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy.reduce_boolean_decision(bool(bad), all=False) if strategy else bad:
            raise CheckpointError(
                f"refusing to save a checkpoint: weight {bad[0] if bad else 'on another rank'} is not finite"
            )
        checkpoint["net_config"] = asdict(self.net_config)
        spec = self.trainer.datamodule.spec if self.trainer.datamodule else None
        if spec is not None:
            index = self.trainer.datamodule.index or {}
            checkpoint["data"] = {  # the clips it was trained on
                "height": index.get("height", spec.height),  # token shards: the size of their video
                "width": index.get("width", spec.width),
                "frames": spec.frames,
                "stride": spec.stride,
                "fps": index["fps"] / spec.stride if index.get("fps") else None,
                "num_actions": index.get("num_actions"),
            }

    def configure_optimizers(self):
        optim, strategy = self.config.optim, self.config.strategy
        groups = decay_groups(self.net, optim.weight_decay)
        betas = (optim.beta1, optim.beta2)
        fused = False
        if strategy.name == "deepspeed" and strategy.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, adamw_mode=True)
        else:
            # The strategy's device, not the module's: DeepSpeed builds the optimizer before it
            # moves the module to the GPU.
            fused = fused_adamw(
                self.trainer.strategy.root_device.type, self.config.trainer.precision, optim.grad_clip
            )
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=betas, fused=fused)
        rank_zero_info(f"optimizer: {type(optimizer).__name__}{' (fused)' if fused else ''}")
        total = optim.schedule_steps or self.config.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, total, optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        bf16_mixed = self.config.trainer.precision == "bf16-mixed"
        if gradient_clip_val and bf16_mixed and self.config.strategy.name != "deepspeed":
            # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, which
            # unscales fp16 gradients itself; bf16 has no loss scale, so the norm is already true.
            # (DeepSpeed clips inside its engine.)
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None and engine.get_global_grad_norm() is not None:
            self.log("train/grad_norm", float(engine.get_global_grad_norm()))


def _finite(tensor: torch.Tensor) -> bool:
    """Whether all of a tensor (of a sharded one: this rank's shard) is finite."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return bool(torch.isfinite(local).all())


class TokenizerModule(WorldModelModule):
    """Stage 1: reconstruct clips through FSQ tokens."""

    def __init__(self, config: TrainConfig, recorded: dict | None = None):
        """`recorded`: the architecture a resumed checkpoint holds (wins over today's preset)."""
        super().__init__(config, TokenizerConfig(**recorded) if recorded else preset(config.model.preset))

    def build_net(self) -> Tokenizer:
        return Tokenizer(self.net_config)

    def compute_loss(self, batch, generator):
        return self.net.training_loss(batch["video"])

    @property
    def tokenizer_config(self):
        return self.net_config

    def flops_per_token(self, video):
        return tokenizer_flops_per_token(self.net_config, *self.token_grid(video))

    def parameter_count(self) -> int:
        return tokenizer_parameters(self.net_config)

    @torch.no_grad()
    def preview(self, batch):
        video = batch["video"][:1]
        reconstruction = self.net.decode(self.net.encode(video))
        return torch.cat([video, reconstruction], dim=3)[0]  # truth | reconstruction, side by side


class LatentActionModule(WorldModelModule):
    """Latent actions: predict each next frame from the frame before and one of a few codes."""

    def __init__(self, config: TrainConfig, recorded: dict | None = None, num_actions: int = 0):
        """`recorded`: the architecture a resumed checkpoint holds (wins over today's preset);
        `num_actions`: the data's action set, which the probe of task.labelled_share reads."""
        net_config = LatentActionConfig(**recorded) if recorded else preset(config.model.preset)
        if not recorded and config.task.labelled_share > 0:
            net_config.probe_actions = num_actions
        super().__init__(config, net_config)

    def build_net(self) -> LatentActionModel:
        return LatentActionModel(self.net_config)

    def labels(self, batch: dict) -> torch.Tensor | None:
        """The recorded actions (B, T) of the batch's labelled clips, NULL_ACTION elsewhere."""
        share = self.config.task.labelled_share
        if not share:
            return None
        chosen = torch.tensor(labelled(batch["key"], share), device=batch["actions"].device)
        return torch.where(chosen[:, None], batch["actions"], NULL_ACTION)  # (B, T)

    def compute_loss(self, batch, generator):
        return self.net.training_loss(
            batch["video"], generator, self.labels(batch), self.config.task.label_weight
        )

    def token_grid(self, video: torch.Tensor) -> tuple[int, int]:
        frames, height, width = video.shape[1:4]
        return frames, (height // self.net_config.patch) * (width // self.net_config.patch)

    def flops_per_token(self, video):
        return lam_flops_per_token(self.net_config, *self.token_grid(video))

    def parameter_count(self) -> int:
        return lam_parameters(self.net_config)

    @torch.no_grad()
    def preview(self, batch):
        """Truth | each frame after the first as the decoder draws it from the true frames before
        and the latent actions read off the clip."""
        video = batch["video"][:1]
        predicted = self.net.predict(video[:, :-1], self.net.infer(video))[0]  # (T - 1, H, W, 3)
        return torch.cat([video[0], torch.cat([video[0, :1], predicted])], dim=2)


class DynamicsModule(WorldModelModule):
    """Stage 2: predict masked next-frame tokens of a frozen tokenizer, given actions: the data's,
    or the latent actions a frozen latent action model reads off each transition."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: Tokenizer,
        num_actions: int,
        recorded: dict | None = None,
        lam: LatentActionModel | None = None,
    ):
        """`recorded`: the architecture a resumed checkpoint holds (wins over today's preset).
        `lam`: label the transitions with its latent actions instead of the data's actions."""
        if recorded:
            dynamics_config = DynamicsConfig(**recorded)
        else:
            dynamics_config = preset(config.model.preset)
            dynamics_config.vocab_size = tokenizer.vocab_size
            dynamics_config.num_actions = num_actions
            if lam is not None:  # latent actions, or one id per (true, latent) pair
                both = config.task.action_source == "both"
                dynamics_config.num_actions = lam.num_latents * (num_actions if both else 1)
            if config.model.action_conditioning is not None:
                dynamics_config.action_conditioning = config.model.action_conditioning
        super().__init__(config, dynamics_config)
        # Frozen and kept out of the module tree: not trained, not sharded, not in the state dict
        # (they travel in the checkpoint's "tokenizer" and "lam" entries instead).
        self.__dict__["tokenizer"] = tokenizer.eval().requires_grad_(False)
        self.__dict__["lam"] = lam.eval().requires_grad_(False) if lam is not None else None

    def build_net(self) -> Dynamics:
        return Dynamics(self.net_config)

    def frozen(self) -> list[nn.Module]:
        return [self.tokenizer] + ([self.lam] if self.lam is not None else [])

    def on_fit_start(self) -> None:
        for network in self.frozen():
            network.to(self.device)

    def on_validation_start(self) -> None:
        for network in self.frozen():
            network.to(self.device)

    def compute_loss(self, batch, generator):
        task = self.config.task
        return self.net.training_loss(
            self.tokens(batch),
            self.actions(batch),
            generator,
            task.clean_context,
            task.context_noise,
            task.action_dropout,
            # held-out loss stays teacher-forced: comparable across settings, and cheaper
            task.rollout_context if self.training else 0.0,
            task.maskgit_steps,
        )

    def tokens(self, batch: dict) -> torch.Tensor:
        """The batch's token ids (B, T, h, w): read from token shards, or encoded here."""
        if "tokens" in batch:
            return batch["tokens"]
        # The frozen tokenizer runs in fp32 whatever the precision of training: FSQ rounds to a
        # grid, and bf16 would move codes across it, giving tokens that eval never sees.
        with torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.encode(batch["video"])

    def actions(self, batch: dict) -> torch.Tensor:
        """The actions (B, T) that condition the model: the batch's, or (task.action_source latent
        or both) the latent actions of the frozen LAM (lam.conditioning_actions): read off the
        batch's frames here, or once, with its tokens (`worldmodel tokenize --lam`)."""
        if self.lam is None:
            return batch["actions"]
        latent = batch.get("latent_actions")
        if latent is None:
            with torch.autocast(self.device.type, enabled=False):  # fp32, as eval reads them
                latent = latent_conditioning(self.lam, batch["video"])
        return conditioning_from_latent(
            latent, batch["actions"], self.config.task.action_source, self.lam.num_latents
        )

    @property
    def tokenizer_config(self):
        return self.tokenizer.config

    def flops_per_token(self, video):
        # The frozen tokenizer's forward pass is not counted: MFU is the trained model's.
        return dynamics_flops_per_token(
            self.net_config, *self.token_grid(video), clean_context=self.config.task.clean_context
        )

    def parameter_count(self) -> int:
        return dynamics_parameters(self.net_config)

    @torch.no_grad()
    def preview(self, batch):
        if "tokens" in batch:  # from token shards, the truth shown is the tokenizer's reconstruction
            tokens = batch["tokens"][:1]
            video = self.tokenizer.decode(tokens)
        else:
            video = batch["video"][:1]
            tokens = self.tokens({"video": video})
        actions = self.actions({**batch, "video": video, "actions": batch["actions"][:1]})
        context = self.config.task.context_frames
        generator = torch.Generator(device=self.device).manual_seed(0)
        rollout = self.net.generate(
            tokens[:, :context],
            actions,
            frames=video.shape[1] - context,
            steps=self.config.task.maskgit_steps,
            generator=generator,
        )
        predicted = self.tokenizer.decode(torch.cat([tokens[:, :context], rollout], dim=1))
        return torch.cat([video, predicted], dim=3)[0]  # truth | context + rollout

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        for name, network in (("tokenizer", self.tokenizer), ("lam", self.lam)):
            if network is not None:
                checkpoint[name] = {
                    "config": asdict(network.config),
                    "state_dict": {key: value.cpu() for key, value in network.state_dict().items()},
                }
