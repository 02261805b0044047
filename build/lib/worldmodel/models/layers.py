"""Transformer pieces shared by both stages: rotary positions, attention, MLP, the ST block.

A spatiotemporal (ST) block factorizes attention over a video's tokens (B, F, N, D), F frame
entries of N tokens each: spatial attention mixes the N tokens of one frame (2D rotary
positions), then temporal attention mixes the frames at one spatial position (1D rotary
positions), causal by default, so a frame never sees the frames after it. Attention runs
through `scaled_dot_product_attention`, which picks a fused kernel where the device has one.

Temporal attention takes an explicit mask where the causal one is not what is wanted
(sliding windows, teacher-forced training) and can return its keys and values and attend to
cached ones: past frames never change, so generation computes them once (`KVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles (L, dim // 2) of 1D rotary embedding for integer positions (L,)."""
    inverse_frequency = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    return positions.float()[:, None] * inverse_frequency[None, :]


def rotary_1d(length: int, head_dim: int, device=None) -> torch.Tensor:
    """Angles (length, head_dim // 2) for positions 0..length-1."""
    return rotary_angles(torch.arange(length, device=device), head_dim)


def rotary_2d(height: int, width: int, head_dim: int, device=None) -> torch.Tensor:
    """Angles (height * width, head_dim // 2): half the pairs rotate with the row, half with the column."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (h*w,)
    cols = torch.arange(width, device=device).repeat(height)  # (h*w,)
    return torch.cat([rotary_angles(rows, head_dim // 2), rotary_angles(cols, head_dim // 2)], dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (N, heads, L, head_dim) by angles (L, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, heads, L, head_dim/2, 2)
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], dim=-1
    )
    return rotated.flatten(-2).type_as(x)  # (N, heads, L, head_dim)


SHORT_SEQUENCE = 32  # keys; below this, plain matmuls beat the fused CPU kernel


def short_attention(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Attention over a few keys (temporal attention over a clip's frames) as plain matmuls. On
    CPU the fused kernel's backward under an explicit mask dominated a teacher-forced dynamics_xs
    step in bf16 (2.34 s a step with it, 1.54 s with this; fp32: 2.59 / 2.40 s;
    `python benchmarks/atari_diagnostics.py step-time`)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (N, heads, L, P + L)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).type_as(v) @ v  # (N, heads, L, head_dim)


class Attention(nn.Module):
    """Multi-head self-attention over sequences (N, L, D) with rotary positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"width {dim} must split into {heads} heads of a multiple of 4 channels")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        angles: torch.Tensor,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Output (N, L, D) and this call's rotated keys and values (each (N, heads, L, head_dim)).

        `mask` (L, P + L), True where a query may attend, over `past` keys/values (P of them)
        followed by x's own; `causal` is the plain lower-triangular mask without a past."""
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        if x.device.type == "cpu" and keys.shape[2] <= SHORT_SEQUENCE:
            mixed = short_attention(q, keys, values, mask, causal)
        else:
            mixed = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
        return self.out(rearrange(mixed, "n h l d -> n l (h d)")), (k, v)  # (N, L, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


@dataclass
class KVCache:
    """Rotated temporal keys and values of past frames, per block: each (B*N, heads, P, head_dim),
    with the frames' temporal positions (P,)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    positions: torch.Tensor | None = None

    def append(self, new: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor) -> None:
        if self.positions is None:
            self.keys, self.values = [k for k, _ in new], [v for _, v in new]
            self.positions = positions
            return
        self.keys = [torch.cat([old, k], 2) for old, (k, _) in zip(self.keys, new, strict=True)]
        self.values = [torch.cat([old, v], 2) for old, (_, v) in zip(self.values, new, strict=True)]
        self.positions = torch.cat([self.positions, positions])


class STBlock(nn.Module):
    """Pre-norm residual block: spatial attention, temporal attention, MLP.

    `conditioned` blocks take one vector per frame (B, F, D) that scales and shifts every
    normalized input (adaptive layer norm, zero-initialized so training starts unconditioned)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, conditioned: bool = False):
        super().__init__()
        self.spatial_norm = nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads)
        self.temporal_norm = nn.LayerNorm(dim)
        self.temporal = Attention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.modulation = None
        if conditioned:
            self.modulation = nn.Linear(dim, 6 * dim)  # scale and shift for each of the three norms
        self.reset_parameters_after_children()

    def reset_parameters_after_children(self) -> None:
        """Zero modulation: training starts unconditioned (also run after a meta-device build)."""
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(
        self,
        x: torch.Tensor,
        spatial_angles: torch.Tensor,
        temporal_angles: torch.Tensor,
        temporal_mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, F, N, D) -> (B, F, N, D) and the temporal keys/values of x's frames.
        Temporal attention is causal unless `temporal_mask` (F, P + F) says otherwise."""
        batch, frames, _, dim = x.shape
        scales = [None] * 6
        if self.modulation is not None:
            scales = self.modulation(condition).unsqueeze(2).chunk(6, dim=-1)  # each (B, F, 1, D)

        def modulate(norm: nn.Module, h: torch.Tensor, scale, shift) -> torch.Tensor:
            return norm(h) if scale is None else norm(h) * (1 + scale) + shift

        spatial_in = modulate(self.spatial_norm, x, scales[0], scales[1])
        mixed, _ = self.spatial(rearrange(spatial_in, "b f n d -> (b f) n d"), spatial_angles)
        x = x + mixed.view(batch, frames, -1, dim)  # (B, F, N, D)
        temporal_in = rearrange(modulate(self.temporal_norm, x, scales[2], scales[3]), "b f n d -> (b n) f d")
        causal = temporal_mask is None and past is None
        mixed, kv = self.temporal(temporal_in, temporal_angles, causal, temporal_mask, past)
        x = x + rearrange(mixed, "(b n) f d -> b f n d", b=batch)  # (B, F, N, D)
        return x + self.mlp(modulate(self.mlp_norm, x, scales[4], scales[5])), kv


class STTransformer(nn.Module):
    """A stack of ST blocks with a final norm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        checkpointing: bool = False,
        conditioned: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(STBlock(dim, heads, mlp_ratio, conditioned) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing  # recompute each block's activations in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token grids (B, T, h, w, D), causal in time -> (B, T, h, w, D)."""
        _, frames, height, width, dim = x.shape
        spatial_angles = rotary_2d(height, width, dim // self.heads, x.device)
        flat = rearrange(x, "b t h w d -> b t (h w) d")
        out, _ = self.run(flat, spatial_angles, torch.arange(frames, device=x.device))
        return rearrange(out, "b t (h w) d -> b t h w d", h=height)  # (B, T, h, w, D)

    def run(
        self,
        x: torch.Tensor,
        spatial_angles: torch.Tensor,
        temporal_positions: torch.Tensor,
        temporal_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Frame entries x (B, F, N, D) at `temporal_positions` (F,) -> normed output (B, F, N, D)
        and each block's temporal keys/values of these frames. With `cache`, the frames also
        attend to the cached ones (mask (F, P + F))."""
        temporal_angles = rotary_angles(temporal_positions, x.shape[-1] // self.heads)
        new_kv = []
        for index, block in enumerate(self.blocks):
            past = (
                None if cache is None or cache.positions is None else (cache.keys[index], cache.values[index])
            )
            arguments = (x, spatial_angles, temporal_angles, temporal_mask, past, condition)
            if self.checkpointing and self.training:
                x, kv = checkpoint(block, *arguments, use_reentrant=False)
            else:
                x, kv = block(*arguments)
            new_kv.append(kv)
        return self.norm(x), new_kv
