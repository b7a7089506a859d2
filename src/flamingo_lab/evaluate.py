"""`flamingo-eval`: few-shot evaluation of a checkpoint (logic in flamingo_lab.eval).

    flamingo-eval checkpoint=<run folder or .ckpt> [data_root=<world or imported folder>] \
        eval.tasks=[coco,vqav2] eval.shots=[0,4,8,16,32] eval.support=rices
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flamingo_lab.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flamingo_lab.eval.run import evaluate_checkpoint

    content = evaluate_checkpoint(
        cfg.checkpoint, OmegaConf.to_container(cfg.eval, resolve=True), HydraConfig.get().runtime.output_dir,
        data_root=cfg.data_root, progress=bool(cfg.progress), vision_cache_mib=cfg.get("vision_cache_mib"),
    )
    return content["eval"]["overall_score"]


if __name__ == "__main__":
    main()
