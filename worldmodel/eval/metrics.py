"""Frame metrics (PSNR, SSIM, from torchmetrics) and the Fréchet distance between Gaussians (FVD's core).

Frames are uint8 tensors (..., H, W, 3). Per-frame values are returned so callers can average
per horizon step.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _as_images(frames: torch.Tensor) -> torch.Tensor:
    # float64: in float32 the local variances of flat regions carry enough round-off to move
    # SSIM in the fourth decimal (an image against itself scores 0.9997).
    return rearrange(frames.double(), "... h w c -> (...) c h w")  # one image per frame


PSNR_CAP = 60.0  # dB: identical frames (a static game screen copied) would be infinite


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each frame: uint8 (..., H, W, 3) -> (...), capped at PSNR_CAP so that one
    exact frame cannot make an average infinite."""
    values = peak_signal_noise_ratio(
        _as_images(prediction), _as_images(target), data_range=255.0, reduction="none", dim=(1, 2, 3)
    )
    return values.clamp(max=PSNR_CAP).reshape(prediction.shape[:-3])


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (Gaussian window 11, sigma 1.5) of each frame: uint8 (..., H, W, 3) -> (...)."""
    values = structural_similarity_index_measure(
        _as_images(prediction), _as_images(target), data_range=255.0, reduction="none"
    )
    return values.reshape(prediction.shape[:-3])


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the distance between two Gaussians.

    The matrix square root of S1 S2 can come back with tiny imaginary parts or fail on singular
    covariances (fewer samples than dimensions); then both covariances get a small ridge, as
    in the reference FID code, and imaginary residue beyond round-off is an error.
    """
    difference = mu1 - mu2
    root, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(root).all():
        ridge = np.eye(len(sigma1)) * 1e-6
        root = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has imaginary part {np.abs(root.imag).max():.3g}")
        root = root.real
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def action_agreement(latent: torch.Tensor, true: torch.Tensor, shuffles: int = 16) -> dict[str, float]:
    """How much latent action ids say about the true action ids of the same transitions (both
    (N,)): normalized mutual information (0: nothing, 1: one determines the other; torchmetrics,
    arithmetic normalization), and the accuracy of the best latent-to-true mapping (each latent
    action read as the true action it most often comes with) beside the majority action's share,
    the accuracy of knowing nothing. Both scores are biased upward on a finite sample (8 latent
    against 18 uniform true actions over 448 transitions score NMI ~0.06 when unrelated), so each
    comes with its chance level: its mean over `shuffles` pairings of the same ids at random."""
    latent, true = latent.flatten().long().cpu(), true.flatten().long().cpu()
    nmi, mapping = _agreement(latent, true)
    generator = torch.Generator().manual_seed(0)
    chance = torch.tensor(
        [_agreement(latent, true[torch.randperm(len(true), generator=generator)]) for _ in range(shuffles)]
    ).mean(0)  # (2,): NMI and mapping accuracy of unrelated ids with these frequencies
    counts = torch.bincount(true)
    return {
        "nmi": nmi,
        "nmi_chance": float(chance[0]),
        "mapping_accuracy": mapping,
        "mapping_chance": float(chance[1]),
        "majority_accuracy": float(counts.max() / len(true)),
    }


def _agreement(latent: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """NMI and best-mapping accuracy of latent against true ids (both (N,))."""
    import warnings

    from torchmetrics.functional.clustering import normalized_mutual_info_score

    with warnings.catch_warnings():  # torchmetrics' sparse contingency table warns on every call
        warnings.filterwarnings("ignore", "Sparse invariant checks")
        nmi = float(normalized_mutual_info_score(latent, true))
    table = torch.zeros(int(latent.max()) + 1, int(true.max()) + 1)
    table.index_put_((latent, true), torch.ones(len(latent)), accumulate=True)  # (latent, true) counts
    return nmi, float(table.max(dim=1).values.sum() / len(latent))
