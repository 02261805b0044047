import math

import numpy as np
import pytest
import torch

from worldmodel.eval.metrics import (
    PSNR_CAP,
    action_agreement,
    frechet_distance,
    gaussian_statistics,
    psnr,
    ssim,
)


def test_psnr_of_a_known_error_per_frame():
    target = torch.full((2, 3, 16, 16, 3), 100, dtype=torch.uint8)
    prediction = target + 10  # every pixel off by 10: MSE 100
    values = psnr(prediction, target)
    assert values.shape == (2, 3)
    torch.testing.assert_close(values, torch.full((2, 3), 10 * math.log10(255**2 / 100), dtype=torch.float64))


def test_psnr_of_identical_frames_is_capped_not_infinite():
    frames = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(psnr(frames, frames), torch.full((3,), PSNR_CAP, dtype=torch.float64))


def test_ssim_of_uniform_images_matches_its_closed_form():
    mu_x, mu_y = 100.0, 140.0
    prediction = torch.full((4, 32, 32, 3), int(mu_x), dtype=torch.uint8)
    target = torch.full((4, 32, 32, 3), int(mu_y), dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2  # no variance: only the luminance term is left
    expected = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    torch.testing.assert_close(ssim(prediction, target), torch.full((4,), expected, dtype=torch.float64))
    assert ssim(target, target).allclose(torch.ones(4, dtype=torch.float64))


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.5, 2.0, size=8), rng.uniform(0.5, 2.0, size=8)
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A rotation of both covariances changes nothing.
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rotated = frechet_distance(
        mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T
    )
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_against_itself_is_zero_even_when_singular():
    features = np.random.default_rng(1).normal(size=(20, 64))  # fewer samples than dimensions
    mu, sigma = gaussian_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(features[:1])


def test_fvd_through_i3d_is_zero_for_a_set_against_itself_and_grows_with_corruption(tmp_path):
    from worldmodel.eval.i3d import InceptionI3d, fvd, load_i3d

    torch.manual_seed(0)
    weights = tmp_path / "i3d.pt"
    network = InceptionI3d()
    for module in network.modules():  # He init keeps activations alive through 20 random layers
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), weights)  # a weights file in the layout users supply
    network = load_i3d(weights)
    frames = torch.linspace(0, 255, 32).round().to(torch.uint8)
    real = frames.view(1, 1, 1, 32, 1).expand(6, 9, 32, 32, 3).clone()
    real = (real.int() + torch.arange(6).view(6, 1, 1, 1, 1) * 20).clamp(0, 255).to(torch.uint8)
    noisy = (real.int() + torch.randint(-60, 60, real.shape)).clamp(0, 255).to(torch.uint8)
    corrupted = fvd(network, real, noisy)
    assert corrupted > 1.0
    assert abs(fvd(network, real, real)) < 1e-6 * corrupted
    (tmp_path / "bad.pt").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="cannot read I3D weights"):
        load_i3d(tmp_path / "bad.pt")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not I3D weights in the expected layout"):
        load_i3d(tmp_path / "other.pt")


def test_lpips_is_zero_for_identical_frames_and_grows_with_distortion(tmp_path):
    from worldmodel.eval.lpips import LPIPS, load_lpips

    torch.manual_seed(0)
    network = LPIPS()
    # The documented file layout: AlexNet `features.*` plus lin0..lin4 as flat per-channel weights.
    state = {k: v for k, v in network.state_dict().items() if k.startswith("features.")}
    state |= {f"lin{i}": torch.rand(channels) for i, channels in enumerate((64, 192, 384, 256, 256))}
    torch.save(state, tmp_path / "lpips_alex.pt")
    lpips = load_lpips(tmp_path / "lpips_alex.pt")
    frames = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    slightly = (frames.int() + torch.randint(-10, 10, frames.shape)).clamp(0, 255).to(torch.uint8)
    heavily = (frames.int() + torch.randint(-120, 120, frames.shape)).clamp(0, 255).to(torch.uint8)
    assert lpips(frames, frames).shape == (2, 3) and lpips(frames, frames).abs().max() < 1e-6
    assert (lpips(slightly, frames) < lpips(heavily, frames)).all()
    torch.save({"lin0": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not LPIPS-AlexNet weights"):
        load_lpips(tmp_path / "wrong.pt")


class CapturingNetwork(torch.nn.Module):
    """Records what a feature network is fed: the preprocessing is what these tests check."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs, self.inputs = outputs, []

    def forward(self, x):
        self.inputs.append(x)
        return torch.zeros(len(x), self.outputs)


def test_i3d_is_fed_rgb_clips_at_224x224_in_minus_one_to_one():
    # The reference FVD (Unterthiner et al.; StyleGAN-V's port): RGB frames resized to 224x224,
    # pixel values scaled from [0, 255] to [-1, 1], layout (N, C, T, H, W).
    from worldmodel.eval.i3d import i3d_features

    network = CapturingNetwork(400)
    video = torch.zeros(2, 9, 32, 48, 3, dtype=torch.uint8)
    video[..., 0] = 255  # pure red
    video[..., 2] = 51  # a fifth of blue
    i3d_features(network, video)
    (clips,) = network.inputs
    assert clips.shape == (2, 3, 9, 224, 224)
    torch.testing.assert_close(clips[:, 0], torch.ones_like(clips[:, 0]))  # R first: 255 -> +1
    torch.testing.assert_close(clips[:, 1], -torch.ones_like(clips[:, 1]))  # 0 -> -1
    torch.testing.assert_close(clips[:, 2], torch.full_like(clips[:, 2], 51 / 127.5 - 1))


def test_lpips_scales_its_inputs_with_the_reference_constants():
    # The lpips package (Zhang et al., v0.1): images in [-1, 1], then its ScalingLayer's
    # shift [-.030, -.088, -.188] and scale [.458, .448, .450]; AlexNet's five ReLU outputs.
    from worldmodel.eval import lpips

    torch.testing.assert_close(lpips.SHIFT.flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    torch.testing.assert_close(lpips.SCALE.flatten(), torch.tensor([0.458, 0.448, 0.450]))
    network = lpips.LPIPS()
    assert [type(network.features[i]) for i in lpips.TAPS] == [torch.nn.ReLU] * 5
    assert [network.features[i - 1].out_channels for i in lpips.TAPS] == list(lpips.CHANNELS)
    seen = []
    network.features[0].register_forward_hook(lambda module, args, output: seen.append(args[0]))
    frame = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    frame[..., 1] = 255  # pure green
    network(frame, frame)
    expected = (torch.tensor([-1.0, 1.0, -1.0]) - torch.tensor([-0.030, -0.088, -0.188])) / torch.tensor(
        [0.458, 0.448, 0.450]
    )
    torch.testing.assert_close(seen[0][0, :, 0, 0], expected)


def test_action_agreement_reports_what_unrelated_ids_score_beside_what_these_score():
    """8 latent against 18 true actions over 448 transitions, as eval scores one Atari game: ids
    drawn independently score NMI ~0.06, all of it chance; the same ids agreeing score 1."""
    generator = torch.Generator().manual_seed(0)
    true = torch.randint(0, 18, (448,), generator=generator)
    unrelated = action_agreement(torch.randint(0, 8, (448,), generator=generator), true)
    assert unrelated["nmi_chance"] > 0.04, unrelated
    assert abs(unrelated["nmi"] - unrelated["nmi_chance"]) < 0.02, unrelated
    assert abs(unrelated["mapping_accuracy"] - unrelated["mapping_chance"]) < 0.03, unrelated
    named = action_agreement(true % 8, true)  # each latent id names a set of true actions
    assert named["nmi"] > 0.8 > 0.1 > named["nmi_chance"], named
    assert named["mapping_accuracy"] > 0.3 > named["mapping_chance"], named
