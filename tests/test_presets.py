import pytest
import torch

from worldmodel.models.dynamics import Dynamics
from worldmodel.models.flops import dynamics_flops_per_token, dynamics_parameters, mfu, tokenizer_parameters
from worldmodel.models.presets import DYNAMICS_PRESETS, TOKENIZER_PRESETS, preset
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


def test_ladder_spans_debug_to_seven_billion():
    sizes = [dynamics_parameters(preset(name)) for name in DYNAMICS_PRESETS]
    assert sizes == sorted(sizes) and sizes[0] < 1e6 and 6.5e9 < sizes[-1] < 7.5e9


def test_flops_per_token_is_six_n_plus_attention_and_mfu():
    config = preset("dynamics_m")
    flops = dynamics_flops_per_token(config, frames=16, tokens_per_frame=256)
    non_embedding = dynamics_parameters(config) - (config.vocab_size + config.num_actions + 2) * config.dim
    assert flops == 6 * non_embedding + 12 * config.depth * config.dim * (256 + 16)
    assert mfu(flops, 1000.0, flops * 2000.0) == 0.5


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="dynamics_s"):
        preset("dynamics_huge")
