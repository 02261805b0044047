"""Stage 2: an action-conditioned spatiotemporal transformer over token grids, trained with MaskGIT.

Input: token ids (B, T, h, w), some replaced by a mask id, and one action per frame (B, T),
action t being the one taken after frame t, so it conditions frame t + 1, the frame it leads to
(frame 0 gets the null action's embedding). How the action enters (`action_conditioning`):
  - "token": its embedding is one more token of the frame, which spatial attention reads
    (Genie reproductions found a token per frame essential);
  - "add": its embedding is summed into every token of the frame;
  - "adaln": it scales and shifts every normalized input of every block (DIAMOND's choice).
Output: logits over the tokenizer's vocabulary at every position.

Training masks a cosine-scheduled random fraction of the tokens of every frame but the first
and scores the masked ones. With `clean_context`, each masked frame sees the clean frames
before it (teacher forcing), as it will at inference; otherwise (Genie) it sees earlier frames
as masked as itself. Generation is autoregressive over frames; inside a frame, MaskGIT starts
from all-masked and fixes the most confident tokens over a few steps. Past frames never change,
so their keys and values are computed once and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from worldmodel.data import NULL_ACTION
from worldmodel.models.layers import KVCache, STTransformer, rotary_2d

CONDITIONINGS = ("token", "add", "adaln")
# Rows of logits alive at once in training: 4096 x 64000 fp32 logits are 1 GB, where all the
# masked rows of a GPU batch (~80k for 32 clips of 16x16x16 tokens) would be 20 GB.
HEAD_CHUNK_ROWS = 4096


@dataclass
class DynamicsConfig:
    """Architecture of a dynamics model; `vocab_size` comes from the tokenizer checkpoint."""

    vocab_size: int = 64000  # tokenizer codebook size (FSQ levels 8,8,8,5,5,5)
    num_actions: int = 18  # action ids 0..num_actions-1; NULL_ACTION (-1) gets its own embedding
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    action_conditioning: str = "token"  # token | add | adaln (see the module docstring)
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"model.dim {self.dim} must split into {self.heads} heads of a multiple of 4")
        if self.vocab_size < 2 or self.num_actions < 0:
            raise ValueError(f"invalid vocab_size {self.vocab_size} / num_actions {self.num_actions}")
        if self.action_conditioning not in CONDITIONINGS:
            raise ValueError(
                f"action_conditioning must be one of {CONDITIONINGS}, got {self.action_conditioning!r}"
            )


def window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """(Q, K) True where a frame at a query position may attend a frame at a key position: the
    same or an earlier frame, at most `window - 1` frames back (no limit when None)."""
    behind = query_positions[:, None] - key_positions[None, :]  # (Q, K)
    allowed = behind >= 0
    return allowed if window is None else allowed & (behind < window)


class Dynamics(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.mask_id = config.vocab_size  # one extra embedding row for the mask token
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.dim)
        self.action_embedding = nn.Embedding(config.num_actions + 1, config.dim)  # last row: null action
        self.transformer = STTransformer(
            config.dim,
            config.depth,
            config.heads,
            config.mlp_ratio,
            checkpointing=config.checkpointing,
            conditioned=config.action_conditioning == "adaln",
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

    @staticmethod
    def leading_actions(actions: torch.Tensor) -> torch.Tensor:
        """(B, T) actions taken after each frame -> (B, T + 1) the action that led to each
        frame position: the null action for frame 0, action t - 1 for frame t."""
        null = torch.full_like(actions[:, :1], NULL_ACTION)
        return torch.cat([null, actions], dim=1)

    # -- the network over frame entries -------------------------------------------------------
    def run(
        self,
        tokens: torch.Tensor,
        leading: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, list]:
        """Token ids (B, F, h, w) of frame entries at temporal `positions` (F,), each led to by
        the action `leading` (B, F) -> hidden states (B, F, h, w, D) and their keys/values."""
        batch, frames, height, width = tokens.shape
        x = rearrange(self.token_embedding(tokens), "b f h w d -> b f (h w) d")  # (B, F, h*w, D)
        action = self.action_embedding(self.action_rows(leading))  # (B, F, D)
        angles = rotary_2d(height, width, self.config.dim // self.config.heads, tokens.device)
        condition = None
        if self.config.action_conditioning == "token":
            x = torch.cat([x, action[:, :, None]], dim=2)  # (B, F, h*w + 1, D): the action token last
            angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # it has no place
        elif self.config.action_conditioning == "add":
            x = x + action[:, :, None]  # over every position
        else:
            condition = action
        hidden, kv = self.transformer.run(x, angles, positions, mask, cache, condition)
        grid = hidden[:, :, : height * width]  # the action token, if any, is not predicted
        return rearrange(grid, "b f (h w) d -> b f h w d", h=height), kv  # (B, F, h, w, D)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V), in fp32 whatever the training precision
        (bf16 autocast or DeepSpeed's pure bf16): logits of a few units carry only 2-3
        significant digits in bf16, enough to move the cross-entropy and MaskGIT's choices. (On
        GPUs, TF32 rounds the matmul's inputs; it accumulates and returns fp32.) `weight`: the
        head's weight already in fp32 (head_loss casts it once for all its chunks)."""
        weight = self.head.weight.float() if weight is None else weight  # (V, D)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), weight)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Token ids (B, T, h, w) (mask_id where masked) + actions (B, T) -> logits (B, T, h, w, V).
        Causal in time; with `window`, each frame attends to at most window - 1 earlier ones."""
        frames = tokens.shape[1]
        positions = torch.arange(frames, device=tokens.device)
        mask = None if window is None else window_mask(positions, positions, window)
        hidden, _ = self.run(tokens, self.leading_actions(actions)[:, :frames], positions, mask)
        return self.logits(hidden)

    # -- training -------------------------------------------------------------------------------
    def training_loss(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        clean_context: bool = False,
        context_noise: float = 0.0,
        action_dropout: float = 0.0,
        rollout_context: float = 0.0,
        rollout_steps: int = 4,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MaskGIT cross-entropy on masked tokens of frames 1..T-1 (frame 0 is always context).

        `clean_context`: masked frames attend to clean earlier frames (teacher forcing, twice the
        frame entries). `context_noise`: up to this fraction of the clean context tokens is
        replaced by random ids (a per-clip rate), so rollouts learn to recover from their errors.
        `action_dropout`: this share of the clips (drawn per clip) has all its actions replaced by
        the null action, which teaches the action-free prediction that guidance needs.
        `rollout_context`: this share of the clips (drawn per clip) sees, past its first few
        frames, the model's own greedy rollout (`rollout_steps` MaskGIT steps) as context instead
        of the truth, and learns to predict the true frames from it (see `_rolled_out`)."""
        batch, frames, height, width = tokens.shape
        device = tokens.device
        # Cosine schedule: the masked fraction of each frame is cos(pi/2 * u), u ~ U(0, 1).
        fraction = torch.cos(
            math.pi / 2 * torch.rand(batch, frames, 1, 1, device=device, generator=generator)
        )
        mask = torch.rand(batch, frames, height, width, device=device, generator=generator) < fraction
        mask[:, 0] = False
        masked_tokens = tokens.masked_fill(mask, self.mask_id)
        if action_dropout > 0:
            hidden_actions = torch.rand(batch, 1, device=device, generator=generator) < action_dropout
            actions = actions.masked_fill(hidden_actions, NULL_ACTION)  # (B, T): whole clips
        leading = self.leading_actions(actions)[:, :frames]
        positions = torch.arange(frames, device=device)
        if clean_context:
            context = self._rolled_out(tokens, actions, rollout_context, rollout_steps, generator)
            context = self._noised(context, context_noise, generator)
            entries = torch.cat([context, masked_tokens[:, 1:]], dim=1)  # (B, 2T - 1, h, w)
            entry_positions = torch.cat([positions, positions[1:]])  # (2T - 1,)
            hidden, _ = self.run(
                entries,
                torch.cat([leading, leading[:, 1:]], dim=1),
                entry_positions,
                self._teacher_forcing_mask(frames, device),
            )
            hidden = hidden[:, frames:]  # the masked entries of frames 1..T-1: (B, T - 1, h, w, D)
        else:
            hidden, _ = self.run(masked_tokens, leading, positions)
            hidden = hidden[:, 1:]  # frame 0 is never masked: (B, T - 1, h, w, D)
        scored = mask[:, 1:]
        loss, accuracy = self.head_loss(hidden[scored], tokens[:, 1:][scored])  # (masked, D), (masked,)
        return loss, {"masked_accuracy": accuracy, "masked_fraction": scored.float().mean()}

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy of the logits of hidden states (N, D) against targets (N,),
        HEAD_CHUNK_ROWS rows at a time, each chunk's logits recomputed in backward rather than saved:
        for a large vocabulary they would be the largest activation of the whole model."""
        if not len(targets):
            return hidden.sum() * 0, hidden.sum().detach() * 0
        # Cast once, outside the chunks: with bf16 weights (DeepSpeed, FSDP2) the chunks' weight
        # gradients then add up in fp32 and are rounded to bf16 once, not once per chunk. The
        # recomputation reads this copy, never the (possibly resharded) parameter.
        weight = self.head.weight.float()  # (V, D); the parameter itself when it is fp32
        loss, correct = 0.0, 0
        for chunk, chunk_targets in zip(
            hidden.split(HEAD_CHUNK_ROWS), targets.split(HEAD_CHUNK_ROWS), strict=True
        ):  # (<= HEAD_CHUNK_ROWS, D), (<= HEAD_CHUNK_ROWS,)
            chunk_loss, chunk_correct = checkpoint(
                self._chunk_loss, chunk, chunk_targets, weight, use_reentrant=False, preserve_rng_state=False
            )
            loss, correct = loss + chunk_loss, correct + chunk_correct
        return loss / len(targets), correct.float() / len(targets)

    def _chunk_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(hidden, weight)  # (rows, V) fp32
        return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()

    def _rolled_out(
        self, tokens: torch.Tensor, actions: torch.Tensor, share: float, steps: int, generator
    ) -> torch.Tensor:
        """Clean context tokens (B, T, h, w) where a `share` of the clips keeps its first k frames
        (k drawn per step in 1..T-2) and has frames k..T-2 replaced by the model's own greedy
        rollout from them under the clip's actions, as generation feeds its frames back.
        Teacher forcing only ever shows a model true pasts, so at inference its errors compound
        on pasts it never saw (exposure bias); scheduled sampling and Self Forcing train on its
        own. No gradient flows through the rollout. Frame T-1 is context to no masked frame."""
        batch, frames = tokens.shape[:2]
        if share <= 0 or frames < 3:
            return tokens
        chosen = torch.rand(batch, device=tokens.device, generator=generator) < share  # (B,)
        if not chosen.any():
            return tokens
        kept = int(torch.randint(1, frames - 1, (1,), device=tokens.device, generator=generator))
        rollout = self.generate(
            tokens[chosen, :kept], actions[chosen], frames - 1 - kept, steps=steps, temperature=0.0
        )  # (chosen, T - 1 - k, h, w)
        context = tokens.clone()
        context[chosen, kept : frames - 1] = rollout
        return context

    def _noised(self, tokens: torch.Tensor, level: float, generator) -> torch.Tensor:
        if level <= 0:
            return tokens
        batch = tokens.shape[0]
        rate = level * torch.rand(batch, 1, 1, 1, device=tokens.device, generator=generator)
        replace = torch.rand(tokens.shape, device=tokens.device, generator=generator) < rate
        replace[:, 0] = False  # the first frame stays clean: it is the rollout's real context
        noise = torch.randint(
            0, self.config.vocab_size, tokens.shape, device=tokens.device, generator=generator
        )
        return torch.where(replace, noise, tokens)

    @staticmethod
    def _teacher_forcing_mask(frames: int, device) -> torch.Tensor:
        """(2T - 1, 2T - 1) over [clean 0..T-1, masked 1..T-1]: clean frames are causal among
        themselves; masked frame t sees clean frames < t and itself, nothing masked before it."""
        clean = torch.arange(frames, device=device)
        masked = clean[1:]
        mask = torch.zeros(2 * frames - 1, 2 * frames - 1, dtype=torch.bool, device=device)
        mask[:frames, :frames] = clean[:, None] >= clean[None, :]
        mask[frames:, :frames] = masked[:, None] > clean[None, :]
        mask[frames:, frames:] = torch.eye(frames - 1, dtype=torch.bool, device=device)
        return mask

    # -- generation -----------------------------------------------------------------------------
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
        use_cache: bool = True,
        guidance: float = 0.0,
    ) -> torch.Tensor:
        """Roll out `frames` new frames after context tokens (B, Tc, h, w) under actions.

        `actions` (B, >= Tc + frames - 1): action t is taken after frame t. Returns the new
        token ids (B, frames, h, w). `window`: each frame attends to at most window - 1 earlier
        frames (the training clip length), so rollouts can run past the clips the model was
        trained on. `temperature` 0 decodes greedily (the most likely token). `use_cache`
        False recomputes every past frame at every step (the reference the cache must equal).
        `guidance` w > 0: classifier-free guidance on the actions, logits + w * (logits - logits
        without actions), which strengthens what the actions change (a model trained with
        `action_dropout` knows the action-free prediction; others do not).
        """
        batch, context_frames, height, width = context.shape
        total = context_frames + frames
        if actions.shape[1] < total - 1:
            raise ValueError(
                f"{frames} new frames after {context_frames} need {total - 1} actions, got {actions.shape[1]}"
            )
        if window is not None and window < 2:
            raise ValueError(f"window must hold at least one past frame and the new one, got {window}")
        leading = self.leading_actions(actions[:, : total - 1])  # (B, total)
        if guidance:  # the batch twice, with its actions and without: (2B, total)
            leading = torch.cat([leading, torch.full_like(leading, NULL_ACTION)])

        def both(entries: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (2B, ...) under guidance
            return torch.cat([entries, entries]) if guidance else entries

        def guided(logits: torch.Tensor) -> torch.Tensor:  # (2B, h, w, V) -> (B, h, w, V)
            if not guidance:
                return logits
            conditional, action_free = logits.float().chunk(2)
            return conditional + guidance * (conditional - action_free)

        device = context.device
        sequence = context
        cache = None
        if use_cache:
            cache = KVCache()
            positions = torch.arange(context_frames, device=device)
            _, kv = self.run(
                both(context),
                leading[:, :context_frames],
                positions,
                window_mask(positions, positions, window),
            )
            cache.append(kv, positions)
        for position in range(context_frames, total):
            if use_cache:
                here = torch.tensor([position], device=device)
                mask = window_mask(here, torch.cat([cache.positions, here]), window)

                def logits_of(frame, here=here, mask=mask, position=position):
                    hidden, _ = self.run(both(frame), leading[:, position : position + 1], here, mask, cache)
                    return guided(self.logits(hidden[:, -1]))
            else:

                def logits_of(frame, past=sequence, position=position):
                    whole = torch.cat([past, frame], dim=1)  # (B, position + 1, h, w)
                    return guided(self(both(whole), leading[:, 1 : position + 1], window)[:, -1])

            frame = self._decode_frame(logits_of, batch, height, width, steps, temperature, top_k, generator)
            sequence = torch.cat([sequence, frame], dim=1)
            if use_cache and position < total - 1:  # the decided frame becomes context
                _, kv = self.run(both(frame), leading[:, position : position + 1], here, mask, cache)
                cache.append(kv, here)
        return sequence[:, context_frames:]

    def _decode_frame(
        self, logits_of, batch, height, width, steps, temperature, top_k, generator
    ) -> torch.Tensor:
        """MaskGIT inside one frame: (B, 1, h, w) ids, fixing the most confident tokens each step.
        `logits_of(frame)` gives the logits (B, h, w, V) of a partly masked frame (B, 1, h, w)."""
        positions = height * width
        device = self.head.weight.device
        frame = torch.full((batch, 1, height, width), self.mask_id, dtype=torch.long, device=device)
        fixed = torch.zeros(batch, positions, dtype=torch.bool, device=device)
        for step in range(steps):
            logits = logits_of(frame).flatten(1, 2).float()  # (B, h*w, V)
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
