"""`flamingo-train`: compose the config, train, write results.json (logic in flamingo_lab.training.run)."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flamingo_lab.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flamingo_lab.training.run import train

    results = train(cfg, HydraConfig.get().runtime.output_dir)
    return results["loss"]["final"]


if __name__ == "__main__":
    main()
