"""Roll a trained world model out on held-out clips and score it against the truth.

For each clip: the first `context` frames are tokenized and given; `horizon` frames are
generated under the clip's true actions and decoded. Scored per horizon step against the real
frames: the model, the copy-last-frame baseline (the prediction to beat), the tokenizer's own
reconstruction (the ceiling), and, where the data has actions, the model under random actions
(ΔtPSNR = PSNR with true actions - PSNR with random ones, as in the Genie paper). A model of
latent actions is conditioned on the latent actions its LAM reads off the true clip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from worldmodel.data import NULL_ACTION
from worldmodel.eval.metrics import psnr, ssim
from worldmodel.models.dynamics import Dynamics, DynamicsConfig
from worldmodel.models.lam import LatentActionConfig, LatentActionModel, conditioning_actions
from worldmodel.models.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.training.checkpoint import (
    CheckpointError,
    net_state_dict,
    read_stage_checkpoint,
    recorded_net_config,
)


@dataclass
class WorldModel:
    dynamics: Dynamics
    tokenizer: Tokenizer
    config: dict  # the training config the checkpoint was written with
    trained_on: dict  # clip size, frames and action count of the training data
    lam: LatentActionModel | None = None  # what labelled its transitions, if it learned latent actions

    @property
    def num_actions(self) -> int:
        return self.dynamics.config.num_actions

    def to(self, device: str | torch.device) -> WorldModel:
        for network in (self.dynamics, self.tokenizer, self.lam):
            if network is not None:
                network.to(device)
        return self

    @property
    def action_source(self) -> str:
        """true, latent or both (config.task.action_source)."""
        return self.config["task"].get("action_source", "true")

    def conditioning(self, video: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The actions (B, T) a clip's rollout is conditioned on: the data's `actions`, or for a
        model of latent actions what its LAM reads off the clip (lam.conditioning_actions)."""
        if self.lam is None:
            return actions
        return conditioning_actions(self.lam, video, actions, self.action_source)

    @property
    def device(self) -> torch.device:
        return self.dynamics.head.weight.device

    @property
    def window(self) -> int:
        """Frames the dynamics model attends to at once: the clip length it was trained on."""
        return int(self.config["data"]["frames"])


def load_world_model(path: str | os.PathLike, weights: str = "ema") -> WorldModel:
    """A dynamics checkpoint (file, DeepSpeed folder or export) with the tokenizer it embeds;
    `weights`: the EMA where training kept one (default), or "raw"."""
    return world_model_from(*read_stage_checkpoint(path, "dynamics"), path, weights)


def world_model_from(
    checkpoint: dict, config: dict, path: str | os.PathLike, weights: str = "ema"
) -> WorldModel:
    """The world model of a read dynamics checkpoint, in eval mode."""
    if "tokenizer" not in checkpoint:
        raise CheckpointError(f"{path}: dynamics checkpoint without its tokenizer entry")
    tokenizer = Tokenizer(TokenizerConfig(**checkpoint["tokenizer"]["config"]))
    tokenizer.load_state_dict(checkpoint["tokenizer"]["state_dict"])
    state = net_state_dict(checkpoint, weights)
    dynamics_config = recorded_net_config(checkpoint, config, DynamicsConfig)
    if "net_config" not in checkpoint:  # written before checkpoints carried it
        dynamics_config.vocab_size = tokenizer.vocab_size
        dynamics_config.num_actions = state["action_embedding.weight"].shape[0] - 1  # last row: null
        dynamics_config.action_conditioning = "add"  # the only kind there was then
    dynamics_config.checkpointing = False
    dynamics = Dynamics(dynamics_config)
    dynamics.load_state_dict(state)
    lam = None
    if "lam" in checkpoint:
        lam = LatentActionModel(LatentActionConfig(**checkpoint["lam"]["config"]))
        lam.load_state_dict(checkpoint["lam"]["state_dict"])
        lam.eval()
    return WorldModel(dynamics.eval(), tokenizer.eval(), config, checkpoint.get("data") or {}, lam)


@dataclass(frozen=True)
class RolloutSettings:
    context: int = 4
    horizon: int = 12
    maskgit_steps: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    guidance: float = 0.0  # classifier-free guidance on the actions (Dynamics.generate)


@torch.no_grad()
def rollout(
    model: WorldModel, tokens: torch.Tensor, actions: torch.Tensor, settings: RolloutSettings, generator
):
    """Decoded frames (B, horizon, H, W, 3) after context tokens (B, context, h, w), under `actions`."""
    generated = model.dynamics.generate(
        tokens,
        actions,
        frames=settings.horizon,
        steps=settings.maskgit_steps,
        temperature=settings.temperature,
        top_k=settings.top_k,
        generator=generator,
        window=model.window,
        guidance=settings.guidance,
    )
    decoded = model.tokenizer.decode(torch.cat([tokens, generated], dim=1))
    return decoded[:, settings.context :]


@torch.no_grad()
def score_batch(model: WorldModel, batch: dict, settings: RolloutSettings, lpips=None) -> tuple[dict, dict]:
    """Per-clip, per-step scores (each (B, horizon), on CPU) of one batch, and the frames
    (B, horizon, H, W, 3) scored: "truth", "model" (true actions) and, where the data has
    actions, "random_actions". `lpips`: an LPIPS network (eval/lpips.py) to add perceptual
    distances, or None."""
    span = settings.context + settings.horizon
    device = model.device
    video = batch["video"][:, :span].to(device)
    actions = model.conditioning(video, batch["actions"][:, :span].to(device))  # (B, span)
    truth = video[:, settings.context :]  # (B, horizon, H, W, 3)
    generator = torch.Generator(device).manual_seed(settings.seed)
    # Tokenized once: the tokenizer is causal, so the context's tokens are the clip's first ones.
    tokens = model.tokenizer.encode(video)  # (B, context + horizon, h, w)
    context = tokens[:, : settings.context]
    predicted = rollout(model, context, actions, settings, generator)
    copy_last = video[:, settings.context - 1 : settings.context].expand_as(truth)
    reconstruction = model.tokenizer.decode(tokens)[:, settings.context :]
    frames = {"truth": truth, "model": predicted}
    scores = {
        "model_psnr": psnr(predicted, truth),
        "model_ssim": ssim(predicted, truth),
        "copy_last_psnr": psnr(copy_last, truth),
        "copy_last_ssim": ssim(copy_last, truth),
        "tokenizer_psnr": psnr(reconstruction, truth),
    }
    if lpips is not None:
        from worldmodel.eval.lpips import resize_for_lpips

        sized = {
            name: resize_for_lpips(clips.cpu())
            for name, clips in (("truth", truth), ("model", predicted), ("copy", copy_last))
        }
        scores["model_lpips"] = lpips(sized["model"], sized["truth"])
        scores["copy_last_lpips"] = lpips(sized["copy"], sized["truth"])
    if model.num_actions > 0 and bool((actions[:, : span - 1] != NULL_ACTION).all()):
        # Uniform over the whole action set at every step (Genie's ΔtPSNR): what the model does
        # when the actions carry no information about the true frames. For latent actions: the
        # LAM's reading of the clip against uniformly drawn latent actions.
        random_actions = torch.randint(
            0, model.num_actions, actions.shape, generator=generator, device=device
        )
        randomized = rollout(
            model, context, random_actions, settings, torch.Generator(device).manual_seed(settings.seed)
        )
        frames["random_actions"] = randomized
        scores["random_action_psnr"] = psnr(randomized, truth)
        scores["delta_t_psnr"] = scores["model_psnr"] - scores["random_action_psnr"]
    return {name: values.cpu() for name, values in scores.items()}, {n: f.cpu() for n, f in frames.items()}


@torch.no_grad()
def generate_from_video(
    model: WorldModel, path: str | os.PathLike, actions: list[int], context: int, settings: RolloutSettings
):
    """Frames (context + len(actions), H, W, 3): the first `context` frames of a video file, then
    the world model's continuation, frame i + 1 following action i."""
    from worldmodel.data.video import iter_frames, resize_short_side_center_crop

    size = model.trained_on.get("height") or 64
    fps = model.config["data"].get("fps")
    frames = []
    for _, rgb in iter_frames(str(path), fps):
        frames.append(torch.from_numpy(resize_short_side_center_crop(rgb, size)))
        if len(frames) == context:
            break
    if len(frames) < context:
        raise ValueError(f"{path}: {len(frames)} frames, --context asks for {context}")
    if any(not 0 <= action < model.num_actions for action in actions):
        flag = "--latent-actions" if model.action_source == "latent" else "--actions"
        raise ValueError(f"{flag} must be ids in [0, {model.num_actions}), got {actions}")
    device = model.device
    video = torch.stack(frames)[None].to(device)  # (1, context, H, W, 3)
    # Actions of the context frames before the last are unknown: the null action.
    sequence = torch.tensor([[NULL_ACTION] * (context - 1) + list(actions)], device=device)
    run = replace(settings, context=context, horizon=len(actions))
    tokens = model.tokenizer.encode(video)
    generated = rollout(model, tokens, sequence, run, torch.Generator(device).manual_seed(settings.seed))
    return torch.cat([video, generated], dim=1)[0].cpu()
