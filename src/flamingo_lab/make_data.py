"""`flamingo-data`: write the embedded world (shards, tokenizer, world.json) to ``out_dir``.

    flamingo-data                                  # conf/world/embedded.yaml -> data/embedded
    flamingo-data world=tiny out_dir=/tmp/tiny     # the test world
    flamingo-data world.seed=1 force=true          # rewrite whatever is there

A complete world with the same config (and format) at ``out_dir`` is left as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from flamingo_lab.data.world import MANIFEST, WorldConfig, world_identity, write_world

log = logging.getLogger("flamingo_lab.make_data")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_world(world: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> WorldConfig:
    """The ``WorldConfig`` that ``flamingo-data world=<world> <overrides>`` would use (for tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("make_data", overrides=[f"world={world}", *overrides])
    return WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True))


def existing_config(out_dir: Path) -> dict | None:
    """The config of the complete world at ``out_dir``, or None if there is none (or it is of another format)."""
    try:
        from flamingo_lab.data.shards import load_world

        return load_world(out_dir)["config"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
        return None  # (TypeError, AttributeError: a world.json that holds no manifest object)


def run(cfg: DictConfig) -> dict | None:
    world = WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True))
    out_dir = Path(cfg.out_dir)
    have = existing_config(out_dir)
    if not cfg.force and have is not None and world_identity(have) == world_identity(asdict(world)):
        log.info("world %r already complete at %s with this config: skipping (force=true rewrites it)",
                 world.name, out_dir)
        return None
    manifest = write_world(world, out_dir, progress=cfg.get("progress", True))
    counts = manifest["counts"]
    log.info(
        "wrote world %r to %s in %.1f s: train %s, val %s, tasks %s, vocab %d",
        world.name, out_dir.resolve(), manifest["elapsed_s"], counts["train"], counts["val"],
        {t: spec["counts"] for t, spec in manifest["tasks"].items()}, manifest["vocab_size"],
    )
    log.info("manifest: %s", out_dir.resolve() / MANIFEST)
    return manifest


@hydra.main(config_path=CONF_DIR, config_name="make_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
