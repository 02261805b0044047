"""Stage 2: an action-conditioned spatiotemporal transformer over token grids, trained with MaskGIT.

Input: token ids (B, T, h, w), some replaced by a mask id, and one action per frame (B, T),
action t being the one taken after frame t. The embedding of action t is added to every token of
frame t + 1, the frame it leads to (frame 0 gets the null action's): each token being predicted
sees the action that moved the world there directly, not only through attention to the previous
frame. Output: logits over the tokenizer's vocabulary at every position.

Training masks a cosine-scheduled random fraction of the tokens of every frame but the first
and scores the masked ones. Generation is autoregressive over frames; inside a frame, MaskGIT
starts from all-masked and fixes the most confident tokens over a few steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.data import NULL_ACTION
from worldmodel.models.layers import STTransformer


@dataclass
class DynamicsConfig:
    """Architecture of a dynamics model; `vocab_size` comes from the tokenizer checkpoint."""

    vocab_size: int = 64000  # tokenizer codebook size (FSQ levels 8,8,8,5,5,5)
    num_actions: int = 18  # action ids 0..num_actions-1; NULL_ACTION (-1) gets its own embedding
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"model.dim {self.dim} must split into {self.heads} heads of a multiple of 4")
        if self.vocab_size < 2 or self.num_actions < 0:
            raise ValueError(f"invalid vocab_size {self.vocab_size} / num_actions {self.num_actions}")


class Dynamics(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.mask_id = config.vocab_size  # one extra embedding row for the mask token
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.dim)
        self.action_embedding = nn.Embedding(config.num_actions + 1, config.dim)  # last row: null action
        self.transformer = STTransformer(
            config.dim, config.depth, config.heads, config.mlp_ratio, checkpointing=config.checkpointing
        )
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def action_rows(self, actions: torch.Tensor) -> torch.Tensor:
        """Action ids (B, T) to embedding rows: NULL_ACTION maps to the last row."""
        if actions.max() >= self.config.num_actions or actions.min() < NULL_ACTION:
            raise ValueError(
                f"action ids must be in [0, {self.config.num_actions}) or {NULL_ACTION} (no action), "
                f"got {int(actions.min())}..{int(actions.max())}"
            )
        return torch.where(actions == NULL_ACTION, self.config.num_actions, actions)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T, h, w) (mask_id where masked) + actions (B, T) -> logits (B, T, h, w, V)."""
        x = self.token_embedding(tokens)  # (B, T, h, w, D)
        null = torch.full_like(actions[:, :1], NULL_ACTION)
        leading_to = torch.cat([null, actions[:, :-1]], dim=1)  # (B, T): the action before each frame
        x = x + self.action_embedding(self.action_rows(leading_to))[:, :, None, None, :]  # over h, w
        return self.head(self.transformer(x))

    def training_loss(
        self, tokens: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MaskGIT cross-entropy on masked tokens of frames 1..T-1 (frame 0 is always context)."""
        batch, frames, height, width = tokens.shape
        device = tokens.device
        # Cosine schedule: the masked fraction of each frame is cos(pi/2 * u), u ~ U(0, 1).
        fraction = torch.cos(
            math.pi / 2 * torch.rand(batch, frames, 1, 1, device=device, generator=generator)
        )
        mask = torch.rand(batch, frames, height, width, device=device, generator=generator) < fraction
        mask[:, 0] = False
        logits = self(tokens.masked_fill(mask, self.mask_id), actions)
        loss = F.cross_entropy(logits[mask], tokens[mask]) if mask.any() else logits.sum() * 0
        with torch.no_grad():
            accuracy = (logits[mask].argmax(-1) == tokens[mask]).float().mean() if mask.any() else loss
        return loss, {"masked_accuracy": accuracy, "masked_fraction": mask[:, 1:].float().mean()}

    @torch.no_grad()
    def generate(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        frames: int,
        steps: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Roll out `frames` new frames after context tokens (B, Tc, h, w) under actions.

        `actions` (B, >= Tc + frames - 1): action t is taken after frame t. Returns the new
        token ids (B, frames, h, w). `window`: the most frames the model attends to at once
        (its training clip length); older frames drop out, so rollouts can run longer than the
        clips it was trained on. `temperature` 0 decodes greedily (the most likely token).
        """
        batch, context_frames, height, width = context.shape
        total = context_frames + frames
        if actions.shape[1] < total - 1:
            raise ValueError(
                f"{frames} new frames after {context_frames} need {total - 1} actions, got {actions.shape[1]}"
            )
        null = torch.full((batch, 1), NULL_ACTION, dtype=actions.dtype, device=actions.device)
        actions = torch.cat([actions[:, : total - 1], null], dim=1)[
            :, :total
        ]  # the last frame has no action yet
        if window is not None and window < 2:
            raise ValueError(f"window must hold at least one past frame and the new one, got {window}")
        sequence = context
        for _ in range(frames):
            length = sequence.shape[1]
            start = 0 if window is None else max(0, length + 1 - window)
            frame = self._decode_frame(
                sequence[:, start:], actions[:, start : length + 1], steps, temperature, top_k, generator
            )
            sequence = torch.cat([sequence, frame], dim=1)
        return sequence[:, context_frames:]

    def _decode_frame(self, past, actions, steps, temperature, top_k, generator) -> torch.Tensor:
        """MaskGIT inside one frame: (B, h, w) ids, fixing the most confident tokens each step."""
        batch, _, height, width = past.shape
        positions = height * width
        frame = torch.full((batch, 1, height, width), self.mask_id, dtype=past.dtype, device=past.device)
        fixed = torch.zeros(batch, positions, dtype=torch.bool, device=past.device)
        for step in range(steps):
            logits = self(torch.cat([past, frame], dim=1), actions)[:, -1].flatten(1, 2)  # (B, h*w, V)
            logits = logits.float()
            if temperature == 0:
                probabilities = logits.softmax(-1)
                sampled = probabilities.argmax(-1)  # (B, h*w)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probabilities = logits.softmax(-1)
                sampled = torch.multinomial(probabilities.flatten(0, 1), 1, generator=generator).view(
                    batch, positions
                )
            confidence = probabilities.gather(-1, sampled[..., None]).squeeze(-1)
            current = frame.flatten(1)  # (B, h*w)
            candidates = torch.where(fixed, current, sampled)
            confidence = torch.where(fixed, torch.inf, confidence)
            # After this step, 1 - cos(pi/2 * (step+1)/steps) of the frame is fixed (all of it at the end).
            keep = max(1, math.ceil(positions * (1 - math.cos(math.pi / 2 * (step + 1) / steps))))
            chosen = confidence.topk(min(keep, positions), dim=-1).indices
            fixed = torch.zeros_like(fixed).scatter_(1, chosen, True)
            frame = torch.where(fixed, candidates, self.mask_id).view(batch, 1, height, width)
        return frame
