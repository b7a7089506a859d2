"""Run the pretraining stages a training config needs, or reuse their cached results.

A run whose frozen parts are the embedded world's own (no ``model.lm.path``, no
``model.vision.checkpoint``) gets them from the cache under ``pretrain.cache_dir``; a missing
stage is built first (it takes about a minute each on 2 cores, once for every row of a sweep).
The config that comes back points at the cached weights, so ``results.json`` records them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from flamingo_lab.machine import machine

from . import cache

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _locked(folder: Path):
    """One builder per stage folder across processes (parallel sweep jobs, DDP ranks)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why this run stands still (a stage build takes minutes)
            log.info("pretraining stage %s: another process is building it; waiting for it", folder.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_stage(stage: str, key_cfg: dict, world: dict, cache_root: str | Path,
                 build: Callable[[Path], dict], progress: bool = True) -> tuple[Path, dict, bool]:
    """The cached folder of ``stage`` for ``key_cfg`` (built by ``build(tmp_dir) -> report`` if missing).

    Returns (folder, report, built_now).
    """
    folder = cache.stage_dir(cache_root, stage, key_cfg, world)
    if cache.is_complete(folder):
        return folder, cache.read_report(folder), False
    with _locked(folder):
        if cache.is_complete(folder):  # another process built it while we waited
            return folder, cache.read_report(folder), False
        log.info("pretraining stage %r: building %s", stage, folder)
        started = time.perf_counter()
        tmp = cache.begin(folder)
        try:
            report = build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted build leaves nothing behind
            raise
        report["build_seconds"] = round(time.perf_counter() - started, 1)
        report["key_config"] = key_cfg
        report["machine"] = machine()  # the CPU's kernels change what a build computes (README)
        cache.commit(tmp, folder, report)
        log.info("pretraining stage %r: done in %.0f s", stage, report["build_seconds"])
        return folder, report, True


def _lm_needed(cfg: DictConfig) -> bool:
    """Not for a given LM, or one that is re-initialised anyway."""
    lm = cfg.model.lm
    return lm.path is None and lm.freeze != "train_from_scratch" and bool(cfg.pretrain.lm.enabled)


def _vision_needed(cfg: DictConfig) -> bool:
    return cfg.model.vision.checkpoint is None and bool(cfg.pretrain.vision.enabled)


def _lm_stage(cfg: DictConfig, world: dict, progress: bool) -> dict[str, Any] | None:
    lm = cfg.model.lm
    if not _lm_needed(cfg):
        return None
    from .lm import pretrain_lm

    arch = OmegaConf.to_container(lm.arch, resolve=True)
    settings = OmegaConf.to_container(cfg.pretrain.lm, resolve=True)
    settings.pop("enabled", None)
    key_cfg = {"arch": arch, "settings": settings}
    folder, report, built = ensure_stage(
        "lm", key_cfg, world, cfg.pretrain.cache_dir,
        lambda out: pretrain_lm(arch, world, settings, out, progress=progress), progress)
    with open_dict(cfg):
        cfg.model.lm.path = str(folder)
        cfg.model.lm.tokenizer = str(folder)
    return {"path": str(folder), "built_now": built, **_summary(report)}


def _vision_stage(cfg: DictConfig, world: dict, progress: bool) -> dict[str, Any] | None:
    vision = cfg.model.vision
    if not _vision_needed(cfg):
        return None
    from .vision import pretrain_vision

    vision_cfg = OmegaConf.to_container(vision, resolve=True)
    vision_cfg.pop("checkpoint", None)
    vision_cfg.pop("cache_mib", None)  # the trained Flamingo's feature cache: not the stage's weights
    settings = OmegaConf.to_container(cfg.pretrain.vision, resolve=True)
    settings.pop("enabled", None)
    key_cfg = {"vision": vision_cfg, "settings": settings}
    folder, report, built = ensure_stage(
        "vision", key_cfg, world, cfg.pretrain.cache_dir,
        lambda out: pretrain_vision(vision_cfg, world, settings, out, progress=progress), progress)
    with open_dict(cfg):
        cfg.model.vision.checkpoint = str(folder / "encoder.safetensors")
    return {"path": str(folder), "built_now": built, **_summary(report)}


def _summary(report: dict) -> dict:
    """The report without its bulky parts (per-item lists) for results.json."""
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if not isinstance(vv, list)}
        out[k] = v
    return out


def _vocabulary(world: dict) -> set[str] | None:
    folder = world.get("tokenizer")
    if not folder:
        return None  # imported data or real shards: no tokenizer of their own
    path = Path(world["root"]) / folder / "tokenizer.json"
    return set(json.loads(path.read_text())["model"]["vocab"])


def check_vocabulary(pretrain_world: dict, data_world: dict) -> None:
    """Raise if the training world writes words the stages' world's tokenizer lacks (they would all read as
    ``[UNK]``): the stages learn from ``pretrain.data_root`` and the Flamingo reads ``data.root`` with their tokenizer."""
    have, need = _vocabulary(pretrain_world), _vocabulary(data_world)
    if have is None or need is None:
        return
    missing = sorted(need - have)
    if missing:
        shown = ", ".join(repr(w) for w in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"the world at data.root={data_world['root']} writes {len(missing)} word(s) that the tokenizer of the "
            f"pretraining world at pretrain.data_root={pretrain_world['root']} does not know ({shown}): the "
            f"pretrained LM would read them as [UNK]. Pretrain on a world with these words (pretrain.data_root=), "
            f"or train on a world written with the same vocabulary"
        )


def ensure_pretrained(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Build or reuse the LM and vision stages ``cfg`` needs; point ``cfg.model`` at their weights.

    Returns ``{"lm": {...}, "vision": {...}}`` summaries (absent when a stage does not apply).
    """
    if "pretrain" not in cfg:
        return {}
    from flamingo_lab.data.shards import load_world

    if not (_lm_needed(cfg) or _vision_needed(cfg)):
        return {}
    root = cfg.pretrain.get("data_root") or cfg.data.root  # the stages' world: null is the Flamingo's own
    world = load_world(root)
    if _lm_needed(cfg) and Path(root).resolve() != Path(cfg.data.root).resolve():
        check_vocabulary(world, load_world(cfg.data.root))  # the Flamingo reads data.root with the LM's tokenizer
    out = {}
    for name, stage in (("lm", _lm_stage), ("vision", _vision_stage)):
        summary = stage(cfg, world, progress)
        if summary is not None:
            out[name] = summary
    return out
