"""Train a tokenizer or a dynamics model: `python train.py task=tokenizer model=tokenizer_debug ...`.

Hydra composes configs/train.yaml with the overrides; worldmodel.training.run checks the result
as typed dataclasses and runs it. Sweep sizes with `-m model=dynamics_s,dynamics_m`.
"""

import sys
import warnings

import hydra
from omegaconf import DictConfig

from worldmodel.config import ConfigError
from worldmodel.training.checkpoint import CheckpointError
from worldmodel.training.run import fit, leave_process_group, prepare, to_train_config

# configs/hydra/launcher/submitit_*.yaml keep the launcher plugin's names (hydra/launcher=submitit_slurm)
# and set every field; Hydra checks them against the plugin's schema and warns that it does.
warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema with the same name")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(composed: DictConfig) -> None:
    try:
        config = to_train_config(composed)
        prepared = prepare(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:  # bad input: say what, no traceback
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    fit(config, *prepared)
    leave_process_group()  # a clean end (preempted or done); errors leave by exception


if __name__ == "__main__":
    main()
