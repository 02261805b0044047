"""Train a tokenizer or a dynamics model: `python train.py task=tokenizer model=tokenizer_debug ...`.

Hydra composes configs/train.yaml with the overrides; worldmodel.training.run checks the result
as typed dataclasses and runs it. Sweep sizes with `-m model=dynamics_s,dynamics_m`.
"""

import sys

import hydra
from omegaconf import DictConfig

from worldmodel.config import ConfigError
from worldmodel.training.checkpoint import CheckpointError
from worldmodel.training.run import fit, prepare, to_train_config


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(composed: DictConfig) -> None:
    try:
        config = to_train_config(composed)
        prepared = prepare(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:  # bad input: say what, no traceback
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    fit(config, *prepared)


if __name__ == "__main__":
    main()
