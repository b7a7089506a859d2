"""Evaluate a checkpoint (what ``flamingo-eval`` does): load, evaluate, print the table, write results.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from .harness import evaluate_model

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run folder's ``checkpoints/last.ckpt``."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{path} is a folder without checkpoints/last.ckpt: pass a run folder or a .ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_model(checkpoint: str | Path):
    """``(model, run_config)`` from a training checkpoint (the module rebuilds itself from its config)."""
    from flamingo_lab.training.module import FlamingoModule

    module = FlamingoModule.load_from_checkpoint(str(resolve_checkpoint(checkpoint)), map_location="cpu")
    return module.model.eval(), module.cfg


def evaluate_checkpoint(checkpoint: str | Path, eval_cfg: Mapping, out_dir: str | Path, *,
                        data_root: str | Path | None = None, progress: bool = True,
                        vision_cache_mib: int | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint; ``vision_cache_mib`` (None: the run's own ``model.vision.cache_mib``) sets the
    frozen encoder's feature cache, which serves the support images every prompt repeats."""
    started = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    model, run_cfg = load_model(ckpt)
    if vision_cache_mib is not None:
        from flamingo_lab.models.vision import FeatureCache

        if isinstance(vision_cache_mib, bool) or not isinstance(vision_cache_mib, int) or vision_cache_mib < 0:
            raise ValueError(f"vision_cache_mib must be a whole number of MiB >= 0 (0: no feature cache; null: "
                             f"the run's own model.vision.cache_mib); got {vision_cache_mib!r}")
        model.vision.cache = FeatureCache(vision_cache_mib * 2**20) if vision_cache_mib else None
    root = data_root or run_cfg.get("data", {}).get("root")
    if root is None:
        raise ValueError("the checkpoint's config has no data.root: pass data_root=<world or imported folder>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_model(model, root, eval_cfg, out_dir=out_dir, progress=progress)
    print(result["table"], flush=True)
    content = {
        "checkpoint": str(ckpt.resolve()),
        "run_name": run_cfg.get("run_name"),
        "data_root": str(root),
        "eval": result,
        "metrics": result["metrics"],
        "wall_time_s": time.perf_counter() - started,
        "vision_cache": model.vision.cache.stats() if model.vision.cache is not None else None,
        "config": {"eval": dict(eval_cfg), "run": run_cfg},
    }
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(content, indent=2, default=str))
    tmp.replace(out_dir / "results.json")
    log.info("results: %s", out_dir / "results.json")
    return content
