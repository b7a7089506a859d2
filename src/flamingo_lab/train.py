"""`flamingo-train`: compose the config, train, write results.json (logic in flamingo_lab.training.run).

A run folder with complete results for the same config is skipped (``force=true`` reruns it); an unfinished one
continues from its newest checkpoint when that was trained with the same config and data (``resume=auto``). A failure
is recorded in results.json (``status: failed``); a single run then exits non-zero, while a multirun
(``-m``, e.g. `flamingo-sweep`) goes on with its other jobs.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flamingo_lab.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flamingo_lab.training.run import run

    hydra_cfg = HydraConfig.get()
    results = run(cfg, hydra_cfg.runtime.output_dir, catch=hydra_cfg.mode == RunMode.MULTIRUN)
    return (results.get("loss") or {}).get("final")


if __name__ == "__main__":
    main()
