"""Stage 1: a video autoencoder with finite scalar quantization (FSQ), causal in time.

Each frame goes through a strided conv encoder (spatial downsampling x4, x8 or x16), then ST
blocks whose temporal attention is causal, then a projection to len(levels) channels that FSQ
rounds to a grid: every position becomes one integer id in [0, prod(levels)). The decoder
mirrors it. Tokens of frame t therefore depend only on frames <= t. FSQ has no codebook to
collapse and needs no commitment loss; gradients pass the rounding straight through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.models.layers import STTransformer


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al., 2023) with `levels` values per channel."""

    def __init__(self, levels: list[int]):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = list(levels)
        self.codebook_size = math.prod(levels)
        # Constants, made on the CPU even when the network is built on the meta device (FSDP).
        levels_t = torch.tensor(levels, dtype=torch.float32, device="cpu")
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64, device="cpu"), dim=0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z (..., C) into each channel's range; even level counts are shifted by half a step."""
        levels = self._levels.float()  # fp32 even in a network cast to bf16 as a whole
        half_range = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_range)
        return torch.tanh(z + shift) * half_range - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized codes in [-1, 1] (..., C) of z's dtype, with a straight-through gradient.
        Bounding and rounding run in fp32 whatever the training precision: in bf16, values near
        a rounding boundary land on the wrong side and the codes differ from fp32 inference's."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self.bound(z.float())
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            return (rounded / (self._levels // 2)).to(z.dtype)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., C) in [-1, 1] -> ids (...) in [0, codebook_size)."""
        digits = torch.round(codes * (self._levels // 2) + self._levels // 2).long()  # (..., C) in [0, L)
        return (digits * self._basis).sum(dim=-1)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (...) -> codes (..., C) in [-1, 1]."""
        digits = (ids.long()[..., None] // self._basis) % self._levels.long()  # (..., C)
        return (digits - self._levels // 2) / (self._levels // 2)


@dataclass
class TokenizerConfig:
    """Architecture of a tokenizer; presets in worldmodel/models/presets.py name these."""

    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ levels; product = vocabulary
    downsample: int = 4  # spatial reduction: 4, 8 or 16
    channels: int = 32  # conv width at full resolution (doubles per downsampling, up to 4x)
    dim: int = 64  # transformer width
    depth: int = 2  # ST blocks in the encoder and again in the decoder
    heads: int = 4
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.downsample not in (4, 8, 16):
            raise ValueError(f"model.downsample must be 4, 8 or 16, got {self.downsample}")
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"model.dim {self.dim} must split into {self.heads} heads of a multiple of 4")

    @property
    def stages(self) -> int:
        return int(math.log2(self.downsample))

    def stage_channels(self) -> list[int]:
        """Conv widths from full resolution down: channels, 2x, 4x, 4x, ..."""
        return [self.channels * min(2**i, 4) for i in range(self.stages + 1)]


class Tokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        widths = config.stage_channels()
        down = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for wide, next_wide in zip(widths, widths[1:], strict=False):
            down += [nn.GELU(), nn.Conv2d(wide, next_wide, 4, stride=2, padding=1)]
        self.down = nn.Sequential(*down, nn.GELU(), nn.Conv2d(widths[-1], config.dim, 1))
        self.encoder = STTransformer(
            config.dim, config.depth, config.heads, checkpointing=config.checkpointing
        )
        self.to_code = nn.Linear(config.dim, len(config.levels))
        self.quantizer = FSQ(config.levels)
        self.from_code = nn.Linear(len(config.levels), config.dim)
        self.decoder = STTransformer(
            config.dim, config.depth, config.heads, checkpointing=config.checkpointing
        )
        up = [nn.Conv2d(config.dim, widths[-1], 1)]
        for wide, next_wide in zip(widths[::-1], widths[::-1][1:], strict=False):
            up += [nn.GELU(), nn.ConvTranspose2d(wide, next_wide, 4, stride=2, padding=1)]
        self.up = nn.Sequential(*up, nn.GELU(), nn.Conv2d(widths[0], 3, 3, padding=1))

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    def encode_codes(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video (B, T, H, W, 3) -> quantized codes (B, T, h, w, C)."""
        batch = video.shape[0]
        dtype = self.down[0].weight.dtype  # bf16 when a strategy converted the weights (DeepSpeed, bf16-true)
        pixels = video.to(dtype) / 127.5 - 1.0
        # Convs see one frame at a time, laid out contiguously: fed the permuted view, they run
        # channels-last and give weight gradients laid out unlike their parameters (DDP copies
        # each at every step to fit its buckets).
        frames = rearrange(pixels, "b t h w c -> (b t) c h w").contiguous()
        features = rearrange(self.down(frames), "(b t) d h w -> b t h w d", b=batch)  # (B, T, h, w, D)
        return self.quantizer(self.to_code(self.encoder(features)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, T, h, w, C) -> pixels in [-1, 1] (B, T, H, W, 3)."""
        batch = codes.shape[0]
        features = self.decoder(self.from_code(codes.to(self.from_code.weight.dtype)))  # (B, T, h, w, D)
        frames = self.up(rearrange(features, "b t h w d -> (b t) d h w").contiguous())  # (B*T, 3, H, W)
        return rearrange(frames, "(b t) c h w -> b t h w c", b=batch)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video (B, T, H, W, 3) -> token ids (B, T, h, w)."""
        return self.quantizer.codes_to_ids(self.encode_codes(video))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T, h, w) -> uint8 video (B, T, H, W, 3)."""
        pixels = self.decode_codes(self.quantizer.ids_to_codes(ids))
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def training_loss(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction loss of a uint8 batch, with diagnostics (codebook use, perplexity, PSNR)."""
        target = video.float() / 127.5 - 1.0
        codes = self.encode_codes(video)
        reconstruction = self.decode_codes(codes).float()
        loss = F.mse_loss(reconstruction, target)
        with torch.no_grad():
            # Clamped: codes of a diverged (non-finite) step must not crash the statistics; the
            # non-finite loss stops or skips that step (training.callbacks.NonFiniteGuard).
            ids = self.quantizer.codes_to_ids(codes).flatten().clamp(0, self.vocab_size - 1)
            counts = torch.bincount(ids, minlength=self.vocab_size).float()
            probabilities = counts / counts.sum()
            entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
            error = ((reconstruction.clamp(-1, 1) - target) * 127.5).pow(2).mean()
            diagnostics = {
                "codebook_usage": (counts > 0).float().mean(),
                "perplexity": entropy.exp(),
                "psnr": 10 * torch.log10(255.0**2 / error.clamp_min(1e-10)),
            }
        return loss, diagnostics
