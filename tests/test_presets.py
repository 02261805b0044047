import pytest
import torch

from worldmodel.models.dynamics import Dynamics
from worldmodel.models.flops import (
    dynamics_flops_per_token,
    dynamics_parameters,
    lam_flops_per_token,
    lam_parameters,
    mfu,
    tokenizer_flops_per_token,
    tokenizer_parameters,
)
from worldmodel.models.lam import LatentActionModel
from worldmodel.models.presets import DYNAMICS_PRESETS, LAM_PRESETS, TOKENIZER_PRESETS, preset
from worldmodel.models.tokenizer import Tokenizer


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name", sorted(DYNAMICS_PRESETS))
def test_dynamics_formula_matches_the_module(name):
    config = preset(name)
    with torch.device("meta"):  # the 7B model costs no memory here
        model = Dynamics(config)
    assert abs(dynamics_parameters(config) - count(model)) <= 0.01 * count(model)


@pytest.mark.parametrize("name", sorted(TOKENIZER_PRESETS))
def test_tokenizer_formula_matches_the_module(name):
    config = preset(name)
    with torch.device("meta"):
        model = Tokenizer(config)
    assert abs(tokenizer_parameters(config) - count(model)) <= 0.01 * count(model)


@pytest.mark.parametrize("name", sorted(LAM_PRESETS))
def test_lam_formula_matches_the_module(name):
    config = preset(name)
    with torch.device("meta"):
        model = LatentActionModel(config)
    assert lam_parameters(config) == count(model)


def test_lam_flops_formula_is_within_two_percent_of_what_torch_counts():
    config = preset("lam_debug")
    video = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    measured = measured_training_flops(LatentActionModel(config), lambda model: model.training_loss(video)[0])
    grid = 32 // config.patch
    assert lam_flops_per_token(config, 4, grid * grid) == pytest.approx(
        measured / (2 * 4 * grid * grid), rel=0.02
    )


def test_ladder_spans_debug_to_seven_billion():
    sizes = [dynamics_parameters(preset(name)) for name in DYNAMICS_PRESETS]
    assert sizes == sorted(sizes) and sizes[0] < 1e6 and 6.5e9 < sizes[-1] < 7.5e9


def test_mfu_is_achieved_flops_over_peak():
    flops = dynamics_flops_per_token(preset("dynamics_m"), frames=16, tokens_per_frame=256)
    assert mfu(flops, tokens_per_second=1000.0, peak_flops=flops * 2000.0) == 0.5


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="dynamics_s"):
        preset("dynamics_huge")


def measured_training_flops(model: torch.nn.Module, loss_fn) -> int:
    """FLOPs of one forward + backward counted by torch, attention through the countable math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model).backward()
    return counter.get_total_flops()


def test_dynamics_flops_formula_equals_what_torch_counts():
    config = preset("dynamics_debug")
    frames, height, width = 8, 8, 8
    tokens = torch.randint(0, config.vocab_size, (2, frames, height, width))
    actions = torch.randint(0, config.num_actions, (2, frames))
    measured = measured_training_flops(
        Dynamics(config), lambda model: model(tokens, actions).logsumexp(-1).sum()
    )
    assert measured / tokens.numel() == dynamics_flops_per_token(config, frames, height * width)


@pytest.mark.parametrize("name, size", [("tokenizer_debug", 32), ("tokenizer_s", 32), ("tokenizer_m", 64)])
def test_tokenizer_flops_formula_is_within_two_percent_of_what_torch_counts(name, size):
    config = preset(name)
    video = torch.randint(0, 256, (1, 4, size, size, 3), dtype=torch.uint8)
    measured = measured_training_flops(Tokenizer(config), lambda model: model.training_loss(video)[0])
    grid = size // config.downsample
    formula = tokenizer_flops_per_token(config, 4, grid * grid)
    assert formula == pytest.approx(
        measured / (4 * grid * grid), rel=0.02
    )  # the stem's input needs no gradient
