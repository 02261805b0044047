"""Transformer pieces shared by both stages: rotary positions, attention, MLP, the ST block.

A spatiotemporal (ST) block factorizes attention over a video token grid (B, T, h, w, D):
spatial attention mixes the h*w tokens of one frame (2D rotary positions), then causal
temporal attention mixes the T frames at one spatial position (1D rotary positions), so
position (t, i, j) never sees frames after t. Attention runs through
`scaled_dot_product_attention`, which picks a fused kernel where the device has one.
"""

from __future__ import annotations

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


class Attention(nn.Module):
    """Multi-head self-attention over sequences (N, L, D) with rotary positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"width {dim} must split into {heads} heads of a multiple of 4 channels")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, heads, L, head_dim)
        return self.out(rearrange(mixed, "n h l d -> n l (h d)"))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class STBlock(nn.Module):
    """Pre-norm residual block: spatial attention, causal temporal attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.spatial_norm = nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads)
        self.temporal_norm = nn.LayerNorm(dim)
        self.temporal = Attention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, spatial_angles: torch.Tensor, temporal_angles: torch.Tensor
    ) -> torch.Tensor:
        batch, frames, height, width, _ = x.shape
        tokens = rearrange(x, "b t h w d -> (b t) (h w) d")  # one sequence per frame
        tokens = tokens + self.spatial(self.spatial_norm(tokens), spatial_angles, causal=False)
        tokens = rearrange(tokens, "(b t) (h w) d -> (b h w) t d", b=batch, h=height)  # one per position
        tokens = tokens + self.temporal(self.temporal_norm(tokens), temporal_angles, causal=True)
        tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return rearrange(tokens, "(b h w) t d -> b t h w d", b=batch, h=height)  # (B, T, h, w, D)


class STTransformer(nn.Module):
    """A stack of ST blocks with a final norm, over token grids (B, T, h, w, D)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, checkpointing: bool = False):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(STBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing  # recompute each block's activations in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, frames, height, width, dim = x.shape
        head_dim = dim // self.heads
        spatial_angles = rotary_2d(height, width, head_dim, x.device)
        temporal_angles = rotary_1d(frames, head_dim, x.device)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, spatial_angles, temporal_angles, use_reentrant=False)
            else:
                x = block(x, spatial_angles, temporal_angles)
        return self.norm(x)
