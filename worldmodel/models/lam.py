"""A latent action model (LAM, as in Genie): the actions of video that has none, learned without labels.

The encoder sees two frames, t and t + 1, and their difference, stacked as channels in
overlapping patches (so each token sees what moved in and around its patch, and which way), mixes
the patches in ST blocks and max-pools them into one vector per transition (an agent's few moving
pixels would drown in an average), snapped to the nearest of a few codes (`num_latents`, 8 by
default): the latent action. The decoder sees frames 0..t and their latent
actions (summed into every patch, and scaling and shifting every norm of its blocks, as real
actions condition the dynamics model; causal in time) and predicts frame t + 1 as frame t plus a
change. The code is the only way information about frame t + 1 reaches the decoder, and a handful
of codes cannot describe a frame, only what changed in it that the past did not foretell: what
the agent did. (The past matters: a decoder that sees frame t alone cannot know how fast the
river scrolls or where the opponent was heading, and its codes spend themselves on that.)

Codes are unit vectors, first drawn from the first training batch's encoder outputs, then learned
as an exponential moving average of the encoder outputs assigned to them (no gradient, so no
codebook loss); a code that falls out of use is moved onto an encoder output of the current batch
(dead-code reset). The moving averages are summed over all ranks and the reset's choice comes
from rank 0, so every rank keeps the same codebook without the strategy knowing about it.

Where motion the agent does not cause dominates (Atari's opponents and enemies), the codes follow
it instead of the agent; a share of clips can then lend their recorded actions to a linear probe
on the latent (`probe_actions`, task.labelled_share), which teaches them to the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.data import NULL_ACTION
from worldmodel.models.layers import STTransformer, rotary_2d


@dataclass
class LatentActionConfig:
    """Architecture of a latent action model; presets in worldmodel/models/presets.py name these."""

    num_latents: int = 8  # latent actions (codebook size)
    latent_dim: int = 32  # width of a code
    patch: int = 8  # pixels per side of a patch (one token)
    dim: int = 64  # transformer width
    depth: int = 2  # ST blocks in the encoder and again in the decoder
    heads: int = 4
    mlp_ratio: float = 4.0
    commitment: float = 0.25  # weight of pulling encoder outputs toward their codes
    code_decay: float = 0.99  # moving average of the codes
    dead_code_use: float = 0.1  # a code whose share of use falls below this / num_latents is reset
    # How the encoder's patches become one latent: "max" keeps the strongest motion wherever it is
    # (the few pixels an agent moves survive it); "mean", which checkpoints from before the field
    # hold, dilutes them in every patch's features, and an encoder trained on the true actions
    # themselves stays at chance on Atari with it (README "Latent actions")
    pool: str = "mean"
    frame_difference: bool = False  # the encoder also sees frame t + 1 - frame t (3 more channels)
    # A linear probe from the latent to the recorded action, for labelled clips (task.labelled_share):
    # the size of the recorded action set, 0 for none
    probe_actions: int = 0
    checkpointing: bool = False

    @property
    def encoder_channels(self) -> int:
        """Frames t and t + 1 stacked (6 channels), and their difference (3 more)."""
        return 9 if self.frame_difference else 6

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"model.dim {self.dim} must split into {self.heads} heads of a multiple of 4")
        if self.num_latents < 2:
            raise ValueError(f"num_latents must be >= 2, got {self.num_latents}")
        if self.patch < 2 or self.patch % 2:  # the encoder's patches overlap by half a patch a side
            raise ValueError(f"patch must be an even number of pixels, got {self.patch}")
        if self.pool not in ("mean", "max"):
            raise ValueError(f"pool must be mean or max, got {self.pool!r}")
        if not 0 < self.code_decay < 1:
            raise ValueError(f"code_decay must be in (0, 1), got {self.code_decay}")


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


# The share of use of each code is averaged over ~10 steps: long enough that a code of a rare
# action is not reset by one batch without it, short enough that codes left unused from the start
# (all encoder outputs look alike before training) are moved within a few dozen steps.
USE_DECAY = 0.9


class LatentCodebook(nn.Module):
    """`num_latents` unit vectors, updated as moving averages of what is assigned to them."""

    def __init__(self, num_latents: int, dim: int, decay: float, dead_code_use: float):
        super().__init__()
        self.decay, self.dead_code_use = decay, dead_code_use
        # Buffers, made on the CPU even when the network is built on the meta device (FSDP), and
        # drawn from no generator (so building one draws the same weights as before): the first
        # training batch gives the codes their values.
        self.register_buffer("codes", torch.zeros(num_latents, dim, device="cpu"))
        self.register_buffer("code_sums", torch.zeros(num_latents, dim, device="cpu"))
        self.register_buffer("use", torch.full((num_latents,), 1.0 / num_latents, device="cpu"))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool, device="cpu"))

    @property
    def num_latents(self) -> int:
        return self.codes.shape[0]

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit vectors (..., dim) -> ids (...) of the most similar codes."""
        return (latents.float() @ self.codes.float().T).argmax(-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (...) -> codes (..., dim)."""
        return self.codes[ids]

    @torch.no_grad()
    def update(self, latents: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None) -> None:
        """One moving-average step toward the latents (M, dim) assigned to each code, summed over
        ranks; then codes used by too few transitions are moved onto latents drawn on rank 0."""
        latents = latents.float()
        # distinct latents where the batch has enough (codes drawn twice would start as one)
        order = torch.randperm(len(latents), generator=generator, device=latents.device)
        drawn = order[torch.arange(self.num_latents, device=latents.device) % len(latents)]
        candidates = _from_rank_zero(latents[drawn].contiguous())  # (K, dim), the same on every rank
        if not bool(self.started):  # the first batch: codes where the encoder's outputs are
            self.codes.copy_(candidates)
            self.code_sums.copy_(candidates)
            self.started.fill_(True)
            return
        assigned = F.one_hot(ids, self.num_latents).float()  # (M, K)
        counts = _all_reduce_sum(assigned.sum(0))  # (K,)
        sums = _all_reduce_sum(assigned.T @ latents)  # (K, dim)
        self.use.mul_(USE_DECAY).add_(counts / counts.sum().clamp_min(1), alpha=1 - USE_DECAY)
        self.code_sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codes.copy_(F.normalize(self.code_sums, dim=-1))
        dead = self.use < self.dead_code_use / self.num_latents  # (K,)
        self.codes[dead] = candidates[dead].to(self.codes.dtype)
        self.code_sums[dead] = candidates[dead].to(self.code_sums.dtype)
        self.use[dead] = 1.0 / self.num_latents  # a fresh code gets time to be used


class LatentActionModel(nn.Module):
    def __init__(self, config: LatentActionConfig):
        super().__init__()
        self.config = config
        patch_pixels = 3 * config.patch**2
        # The two frames stacked as 6 channels (9 with their difference), in overlapping patches
        # (twice the size: half a patch of each neighbour): each token sees what moved in and
        # around its patch, and which way, from the first layer on.
        size = config.patch
        self.encoder_patches = nn.Conv2d(
            config.encoder_channels, config.dim, 2 * size, stride=size, padding=size // 2
        )
        self.encoder = STTransformer(
            config.dim, config.depth, config.heads, config.mlp_ratio, config.checkpointing
        )
        self.to_latent = nn.Linear(config.dim, config.latent_dim, bias=False)
        self.codebook = LatentCodebook(
            config.num_latents, config.latent_dim, config.code_decay, config.dead_code_use
        )
        self.from_latent = nn.Linear(config.latent_dim, config.dim)
        self.decoder_patches = nn.Linear(patch_pixels, config.dim)
        self.decoder = STTransformer(
            config.dim, config.depth, config.heads, config.mlp_ratio, config.checkpointing, conditioned=True
        )
        self.to_pixels = nn.Linear(config.dim, patch_pixels)
        self.probe = nn.Linear(config.latent_dim, config.probe_actions) if config.probe_actions else None
        self.reset_parameters_after_children()

    def reset_parameters_after_children(self) -> None:
        """The decoder starts by copying frame t: its change is zero until it learns one (also
        run after a meta-device build, which resets the children first)."""
        nn.init.zeros_(self.to_pixels.weight)
        nn.init.zeros_(self.to_pixels.bias)

    @property
    def num_latents(self) -> int:
        return self.config.num_latents

    def pixels(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video (B, T, H, W, 3) -> pixels in [-1, 1] of the network's dtype."""
        size = self.config.patch
        if video.shape[2] % size or video.shape[3] % size:
            raise ValueError(
                f"frames of {tuple(video.shape[2:4])} pixels do not split into {size}x{size} patches"
            )
        return video.to(self.decoder_patches.weight.dtype) / 127.5 - 1.0

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, H, W, 3) -> patches (B, T, h, w, p*p*3)."""
        size = self.config.patch
        return rearrange(pixels, "b t (h p) (w q) c -> b t h w (p q c)", p=size, q=size)

    def unpatch(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (B, T, h, w, p*p*3) -> frames (B, T, H, W, 3)."""
        size = self.config.patch
        return rearrange(patches, "b t h w (p q c) -> b t (h p) (w q) c", p=size, q=size)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, H, W, 3) in [-1, 1], T >= 2 -> unit latents (B, T - 1, latent_dim), one
        per transition t -> t + 1, each from frames t and t + 1 alone."""
        batch, frames = pixels.shape[:2]
        before, after = pixels[:, :-1], pixels[:, 1:]
        stacked = [before, after, after - before] if self.config.frame_difference else [before, after]
        pairs = torch.cat(stacked, dim=-1)  # (B, T-1, H, W, 6 or 9 channels)
        features = self.encoder_patches(rearrange(pairs, "b t h w c -> (b t) c h w").contiguous())
        height, width = features.shape[2:]
        x = rearrange(features, "m d h w -> m 1 (h w) d")  # one entry per transition: (M, 1, h*w, D)
        angles = rotary_2d(height, width, self.config.dim // self.config.heads, pixels.device)
        hidden, _ = self.encoder.run(x, angles, torch.zeros(1, device=pixels.device))
        # Pooled over the patches: what moved, wherever it moved (a learned query token, as in
        # Genie, needed several times the steps to find the motion in the tests' sprite world).
        pooled = hidden[:, 0].amax(1) if self.config.pool == "max" else hidden[:, 0].mean(1)  # (M, D)
        latents = self.to_latent(pooled)  # (M, latent_dim)
        return F.normalize(latents.float(), dim=-1).view(batch, frames - 1, -1)  # (B, T-1, latent_dim)

    def predict_next(self, patches: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Patches (B, F, h, w, P) of frames 0..F-1 and the codes of what happened after each
        (B, F, latent_dim) -> predicted patches of frames 1..F (B, F, h, w, P): each frame t + 1
        is frame t plus the change the decoder draws from frames <= t and the codes <= t."""
        batch, frames, height, width, _ = patches.shape
        x = rearrange(self.decoder_patches(patches), "b f h w d -> b f (h w) d")  # (B, F, h*w, D)
        condition = self.from_latent(codes.to(x.dtype))  # (B, F, D)
        # Also summed into every patch: adaLN starts at zero, and without a path that reaches the
        # code from the first step, the encoder gets no gradient but the commitment and collapses.
        x = x + condition[:, :, None]
        angles = rotary_2d(height, width, self.config.dim // self.config.heads, patches.device)
        positions = torch.arange(frames, device=patches.device)
        hidden, _ = self.decoder.run(x, angles, positions, condition=condition)  # causal in time
        change = rearrange(self.to_pixels(hidden), "b f (h w) p -> b f h w p", h=height)  # (B, F, h, w, P)
        return patches + change

    @staticmethod
    def transitions(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches (B, T, h, w, P) -> what the decoder starts from, frames 0..T-2, and what it must
        predict, frames 1..T-1 in fp32 (each (B, T - 1, h, w, P))."""
        return patches[:, :-1], patches[:, 1:].float()

    def training_loss(
        self,
        video: torch.Tensor,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        label_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-frame reconstruction through the latent actions of a uint8 batch (B, T, H, W, 3),
        plus the commitment of the encoder to its codes; in training mode, one codebook update.
        `labels` (B, T): the recorded actions of labelled clips, NULL_ACTION elsewhere; the probe
        learns them from the latents and, weighted by `label_weight`, teaches them to the encoder."""
        pixels = self.pixels(video)
        patches = self.patches(pixels)  # (B, T, h, w, P)
        latents = self.encode(pixels)  # (B, T - 1, latent_dim)
        ids = self.codebook.nearest(latents)  # (B, T - 1)
        codes = self.codebook.lookup(ids).to(latents.dtype)
        quantized = latents + (codes - latents).detach()  # straight through to the encoder
        current, target = self.transitions(patches)
        predicted = self.predict_next(current, quantized).float()
        reconstruction = F.mse_loss(predicted, target)
        commitment = F.mse_loss(latents, codes.detach())
        loss = reconstruction + self.config.commitment * commitment
        probe, probe_accuracy = self.probe_loss(latents, labels)
        if probe is not None:
            loss = loss + label_weight * probe
        if self.training:
            self.codebook.update(latents.detach().flatten(0, 1), ids.flatten(), generator)
        with torch.no_grad():
            counts = torch.bincount(ids.flatten(), minlength=self.num_latents).float()
            probabilities = counts / counts.sum()
            entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
            error = ((predicted.clamp(-1, 1) - target) * 127.5).pow(2).mean()
            copy_error = ((current.float() - target) * 127.5).pow(2).mean()
            diagnostics = {
                "codebook_usage": (counts > 0).float().mean(),
                "perplexity": entropy.exp(),
                "psnr": 10 * torch.log10(255.0**2 / error.clamp_min(1e-10)),
                "copy_psnr": 10 * torch.log10(255.0**2 / copy_error.clamp_min(1e-10)),
                "commitment": commitment,
            }
            if probe is not None:
                diagnostics.update(probe=probe.detach(), probe_accuracy=probe_accuracy)
        return loss, diagnostics

    def probe_loss(
        self, latents: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cross-entropy and accuracy of the probe's reading of the latents (B, T - 1, latent_dim)
        against the labels of their transitions (B, T), where there are any."""
        if self.probe is None or labels is None:
            return None, None
        logits = self.probe(latents.to(self.probe.weight.dtype)).float().flatten(0, 1)  # (B*(T-1), A)
        targets = labels[:, :-1].flatten()  # (B*(T-1),)
        labelled = (targets != NULL_ACTION).sum().clamp_min(1)
        # zero (not NaN) where a batch holds no labelled transition, so every rank runs the same graph
        loss = F.cross_entropy(logits, targets, ignore_index=NULL_ACTION, reduction="sum") / labelled
        accuracy = (logits.argmax(-1) == targets).sum() / labelled
        return loss, accuracy.detach()

    @torch.no_grad()
    def infer(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video (B, T, H, W, 3) -> latent action ids (B, T - 1), id t for frame t -> t + 1."""
        return self.codebook.nearest(self.encode(self.pixels(video)))

    @torch.no_grad()
    def predict(self, video: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """uint8 frames 0..F-1 (B, F, H, W, 3) and the latent action ids after each (B, F) -> the
        frames 1..F the decoder draws from them (B, F, H, W, 3), uint8."""
        patches = self.patches(self.pixels(video))  # (B, F, h, w, P)
        pixels = self.unpatch(self.predict_next(patches, self.codebook.lookup(ids)))
        return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def latent_conditioning(lam: LatentActionModel, video: torch.Tensor) -> torch.Tensor:
    """The latent actions (B, T) that condition a dynamics model on a uint8 clip (B, T, H, W, 3):
    what the LAM reads off its T - 1 transitions, the last frame leading nowhere (the null action)."""
    latent = lam.infer(video)  # (B, T - 1)
    return torch.cat([latent, torch.full_like(latent[:, :1], NULL_ACTION)], dim=1)  # (B, T)


def conditioning_from_latent(latent: torch.Tensor, actions: torch.Tensor, source: str, num_latents: int):
    """The actions (B, T) a dynamics model of `source` latent or both is conditioned on, from the
    latent actions (B, T) (latent_conditioning) and the data's `actions` (B, T): the latent ones,
    or one id per (true, latent) pair, true * num_latents + latent, null where either is."""
    if source == "latent":
        return latent
    paired = actions * num_latents + latent
    return torch.where((actions == NULL_ACTION) | (latent == NULL_ACTION), NULL_ACTION, paired)


def conditioning_actions(
    lam: LatentActionModel, video: torch.Tensor, actions: torch.Tensor, source: str
) -> torch.Tensor:
    """conditioning_from_latent of what `lam` reads off a uint8 clip (B, T, H, W, 3)."""
    return conditioning_from_latent(latent_conditioning(lam, video), actions, source, lam.num_latents)
