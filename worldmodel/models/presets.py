"""Named sizes: `tokenizer_*`, `lam_*` and `dynamics_*`, from a test-sized `debug` to 7B parameters.

Dynamics widths and depths follow the GPT-style ladder (head width 64-128, depth growing with
width); each ST block holds two attentions and an MLP, about 16 * dim^2 parameters. The counts
in the comments come from worldmodel.models.flops (checked against the modules in the tests).
"""

from __future__ import annotations

from worldmodel.models.dynamics import DynamicsConfig
from worldmodel.models.lam import LatentActionConfig
from worldmodel.models.tokenizer import TokenizerConfig

TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    "tokenizer_debug": TokenizerConfig(
        levels=[8, 5, 5, 5], downsample=4, channels=16, dim=32, depth=1, heads=2
    ),
    "tokenizer_xs": TokenizerConfig(levels=[8, 5, 5, 5], downsample=4, channels=32, dim=64, depth=1, heads=4),
    "tokenizer_s": TokenizerConfig(
        levels=[8, 8, 8, 5, 5, 5], downsample=4, channels=64, dim=256, depth=4, heads=4
    ),
    # The CoinRun study's size (Genie, reproduced by Jafar: width 512, 8 blocks, 4x4 patches, 1024 codes)
    "tokenizer_coinrun": TokenizerConfig(
        levels=[8, 5, 5, 5], downsample=4, channels=64, dim=512, depth=8, heads=8
    ),
    "tokenizer_m": TokenizerConfig(
        levels=[8, 8, 8, 5, 5, 5], downsample=8, channels=96, dim=512, depth=8, heads=8
    ),
    "tokenizer_l": TokenizerConfig(
        levels=[8, 8, 8, 5, 5, 5], downsample=16, channels=128, dim=768, depth=12, heads=12
    ),
}


def _lam(**architecture) -> LatentActionConfig:
    """A LAM whose encoder sees the frames' difference and keeps each patch's strongest motion."""
    return LatentActionConfig(pool="max", frame_difference=True, **architecture)


# Latent action models: 8 latent actions by default (Genie used 8; the CoinRun reproductions 6),
# patches of 8 pixels at 64x64 and of 16 from the m size up (the reproductions' choice).
LAM_PRESETS: dict[str, LatentActionConfig] = {
    "lam_debug": _lam(patch=8, dim=32, depth=1, heads=2, latent_dim=16),
    "lam_xs": _lam(patch=8, dim=64, depth=2, heads=4),
    "lam_s": _lam(patch=8, dim=256, depth=4, heads=4),
    "lam_m": _lam(patch=16, dim=512, depth=8, heads=8),
    # The CoinRun study's LAM (Jafar: lam_m's size with 6 latent actions)
    "lam_coinrun": _lam(num_latents=6, patch=16, dim=512, depth=8, heads=8),
    "lam_l": _lam(patch=16, dim=768, depth=12, heads=12),
}

# Parameter counts at the s/m/l tokenizers' 64,000-code vocabulary (embedding and head included:
# they dominate the small models).
DYNAMICS_PRESETS: dict[str, DynamicsConfig] = {
    "dynamics_debug": DynamicsConfig(vocab_size=1000, dim=32, depth=2, heads=2),  # 0.1M (tokenizer_debug)
    "dynamics_xs": DynamicsConfig(dim=128, depth=4, heads=4),  # 17M; 1.3M on tokenizer_debug's 1000 codes
    # The CoinRun study's dynamics model (Jafar: width 512, 12 blocks) on tokenizer_coinrun's 1000 codes
    "dynamics_coinrun": DynamicsConfig(vocab_size=1000, dim=512, depth=12, heads=8),  # 51M
    "dynamics_s": DynamicsConfig(dim=512, depth=8, heads=8),  # 99M
    "dynamics_m": DynamicsConfig(dim=768, depth=12, heads=12),  # 212M
    "dynamics_l": DynamicsConfig(dim=1024, depth=20, heads=16),  # 467M
    "dynamics_xl": DynamicsConfig(dim=1536, depth=16, heads=16),  # 801M
    "dynamics_1b": DynamicsConfig(dim=2048, depth=12, heads=16),  # 1.07B
    "dynamics_3b": DynamicsConfig(dim=2560, depth=26, heads=20),  # 3.05B
    "dynamics_7b": DynamicsConfig(dim=4096, depth=24, heads=32),  # 6.97B
}


def all_presets() -> dict:
    """Every preset by name (read at call time: tests swap the tables)."""
    return {**TOKENIZER_PRESETS, **LAM_PRESETS, **DYNAMICS_PRESETS}


def preset(name: str) -> TokenizerConfig | LatentActionConfig | DynamicsConfig:
    """A copy of the named preset's config."""
    from dataclasses import replace

    table = all_presets()
    if name not in table:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(table)}")
    return replace(table[name])
