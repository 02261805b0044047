"""Training entry point (Hydra). The training loop arrives with the training stage; until then
this composes and validates the data config and streams one batch, so the config path is real.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from worldmodel.config import DataConfig
from worldmodel.data.datamodule import VideoDataModule


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    data = VideoDataModule(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)))
    batch = next(iter(data.train_dataloader()))
    print(f"data ok: video {tuple(batch['video'].shape)}, actions {tuple(batch['actions'].shape)}")


if __name__ == "__main__":
    main()
