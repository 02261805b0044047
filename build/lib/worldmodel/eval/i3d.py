"""The I3D network (Carreira & Zisserman, 2017) that FVD measures videos with, and FVD itself.

The layout and parameter names follow the widely used PyTorch port of the Kinetics-400 I3D
(`pytorch-i3d`, file `models/rgb_imagenet.pt`), so its state dict loads as is:

    worldmodel eval CKPT --data DIR --i3d rgb_imagenet.pt

How to obtain the weights: download `rgb_imagenet.pt` from the pytorch-i3d repository's
`models/` folder (Kinetics-400 RGB, ImageNet-inflated). Weights converted from the TF-Hub
`i3d-kinetics-400` model (the one the FVD paper used) load too when their keys are renamed to
this module's (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b0.bn.running_mean`, ...). worldmodel
never downloads them: without a file, FVD is skipped and the report says why.

FVD = Fréchet distance between Gaussians fitted to the 400-d logits of real and generated
clips, each resized to 224x224 and scaled to [-1, 1].
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.eval.metrics import frechet_distance, gaussian_statistics
from worldmodel.eval.weights import load_weights


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one dimension."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride, strict=True))):  # F.pad: last dim first
        pads += _same_padding(size, k, s)
    return F.pad(x, pads)


class MaxPool3dSamePadding(nn.MaxPool3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding, optional batch norm and ReLU."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), norm=True, relu=True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=not norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


# (name, module) in order; channel widths of the Kinetics-400 I3D.
def _layers(num_classes: int) -> list[tuple[str, nn.Module]]:
    return [
        ("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2))),
        ("Conv3d_2b_1x1", Unit3D(64, 64)),
        ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
        ("MaxPool3d_3a_3x3", MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2))),
        ("Mixed_3b", InceptionModule(192, [64, 96, 128, 16, 32, 32])),
        ("Mixed_3c", InceptionModule(256, [128, 128, 192, 32, 96, 64])),
        ("MaxPool3d_4a_3x3", MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(2, 2, 2))),
        ("Mixed_4b", InceptionModule(480, [192, 96, 208, 16, 48, 64])),
        ("Mixed_4c", InceptionModule(512, [160, 112, 224, 24, 64, 64])),
        ("Mixed_4d", InceptionModule(512, [128, 128, 256, 24, 64, 64])),
        ("Mixed_4e", InceptionModule(512, [112, 144, 288, 32, 64, 64])),
        ("Mixed_4f", InceptionModule(528, [256, 160, 320, 32, 128, 128])),
        ("MaxPool3d_5a_2x2", MaxPool3dSamePadding(kernel_size=(2, 2, 2), stride=(2, 2, 2))),
        ("Mixed_5b", InceptionModule(832, [256, 160, 320, 32, 128, 128])),
        ("Mixed_5c", InceptionModule(832, [384, 192, 384, 48, 128, 128])),
    ]


class InceptionI3d(nn.Module):
    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.order = []
        for name, module in _layers(num_classes):
            self.add_module(name, module)
            self.order.append(name)
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(1024, num_classes, norm=False, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, T, 224, 224) in [-1, 1] -> logits averaged over time (B, classes)."""
        for name in self.order:
            x = getattr(self, name)(x)
        x = self.logits(self.dropout(self.avg_pool(x)))  # (B, classes, t, 1, 1)
        return x.squeeze(-1).squeeze(-1).mean(dim=2)


def load_i3d(path: str | os.PathLike) -> InceptionI3d:
    return load_weights(InceptionI3d(), path, "I3D")


@torch.no_grad()
def i3d_features(network: InceptionI3d, videos: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """uint8 videos (N, T, H, W, 3) -> I3D logits (N, 400) at 224x224, pixels in [-1, 1]."""
    features = []
    for start in range(0, len(videos), batch_size):
        clips = rearrange(videos[start : start + batch_size].float(), "n t h w c -> (n t) c h w")
        clips = F.interpolate(clips, size=(224, 224), mode="bilinear", align_corners=False)
        clips = rearrange(clips, "(n t) c h w -> n c t h w", t=videos.shape[1]) / 127.5 - 1.0
        features.append(network(clips).double().numpy())
    return np.concatenate(features)


MIN_FRAMES = 9  # I3D's strides leave no time step for its last pooling below this


def fvd(network: InceptionI3d, real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet Video Distance between two sets of uint8 videos (N, T, H, W, 3)."""
    mu_real, sigma_real = gaussian_statistics(i3d_features(network, real))
    mu_generated, sigma_generated = gaussian_statistics(i3d_features(network, generated))
    return frechet_distance(mu_real, sigma_real, mu_generated, sigma_generated)
