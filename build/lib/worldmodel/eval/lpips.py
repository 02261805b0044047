"""LPIPS (Zhang et al., 2018), AlexNet variant: a perceptual distance between frames.

Five AlexNet feature maps of both images are normalized per position across channels; their
squared differences are weighted per channel by learned 1x1 "lin" layers, averaged over space
and summed. The weights are the user's to supply, as one file holding both parts:

    import torch, torchvision, lpips                       # on a machine that has them
    backbone = torchvision.models.alexnet(weights="IMAGENET1K_V1").features.state_dict()
    lins = lpips.LPIPS(net="alex").state_dict()            # keys lin0.model.1.weight ... lin4...
    torch.save({**{f"features.{k}": v for k, v in backbone.items()},
                **{f"lin{i}": lins[f"lin{i}.model.1.weight"].flatten() for i in range(5)}}, "lpips_alex.pt")

then `worldmodel eval ... --lpips lpips_alex.pt`. Without it LPIPS is skipped and the report says why.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.eval.weights import load_weights

TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in AlexNet's `features` whose outputs are compared
CHANNELS = (64, 192, 384, 256, 256)
# LPIPS's input scaling (ImageNet statistics in [-1, 1] units).
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` layout, so its state dict loads by the same keys."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        for index, channels in enumerate(CHANNELS):
            self.register_parameter(f"lin{index}", nn.Parameter(torch.zeros(1, channels, 1, 1)))

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], (images - SHIFT) / SCALE
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                outputs.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))  # unit length per position
        return outputs

    @torch.no_grad()
    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """uint8 frames (..., H, W, 3) -> LPIPS per frame (...)."""
        shape = prediction.shape[:-3]
        images = [rearrange(x.float(), "... h w c -> (...) c h w") / 127.5 - 1 for x in (prediction, target)]
        distance = 0
        for index, (a, b) in enumerate(zip(*map(self._taps, images), strict=True)):
            weighted = ((a - b) ** 2 * getattr(self, f"lin{index}")).sum(dim=1)  # (N, h, w)
            distance = distance + weighted.mean(dim=(1, 2))
        return distance.reshape(shape)


def load_lpips(path: str | os.PathLike) -> LPIPS:
    def lin_layers_as_1x1(state: dict) -> dict:  # the file holds them flat, per channel
        return {
            key: value.view(1, -1, 1, 1) if key.startswith("lin") else value for key, value in state.items()
        }

    return load_weights(LPIPS(), path, "LPIPS-AlexNet", lin_layers_as_1x1)  # layout: the module docstring


def resize_for_lpips(frames: torch.Tensor, size: int = 64) -> torch.Tensor:
    """AlexNet's strides need frames of at least ~64 px; smaller ones are upsampled."""
    if frames.shape[-2] >= size:
        return frames
    images = rearrange(frames.float(), "... h w c -> (...) c h w")
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (
        rearrange(images, "(n) c h w -> n h w c")
        .reshape(*frames.shape[:-3], size, size, 3)
        .round()
        .to(torch.uint8)
    )
