"""One training run from a composed config: build, fit, validate, write results.json.

The Hydra entry point (`flamingo_lab.train`) only composes and calls :func:`run`, which adds a sweep's
semantics to :func:`train`: a run folder that already holds a complete results.json for the same config
is skipped (unless ``force=true``), and a failure is recorded in results.json (``status: failed``, the
error and the end of its traceback) before it is raised, or, in a multirun, instead of being raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from flamingo_lab.config import ablation_choices
from flamingo_lab.data.mixture import updates_per_step
from flamingo_lab.machine import machine
from flamingo_lab.pretrain import ensure_pretrained
from flamingo_lab.training.callbacks import (EvalCurve, GateLogger, InterruptCheckpoint, LossHistory, RunRecord,
                                             StepTimer, StopTogether)
from flamingo_lab.training.datamodule import FlamingoDataModule
from flamingo_lab.training.module import FlamingoModule
from flamingo_lab.training.sharding import STRATEGY_NAME as SHARDED
from flamingo_lab.training.sharding import check_strategy, is_sharded, unsharded_copy

log = logging.getLogger(__name__)


def make_logger(cfg: DictConfig, run_dir: Path, resuming: bool | None = None):
    """W&B (offline unless ``logger.mode=online``), tagged with the ablation choices; or no logger."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name != "wandb":
        raise ValueError(f"logger={name!r} is unknown; valid: wandb, none")
    from lightning.pytorch.loggers import WandbLogger

    tags = [f"{k}={v}" for k, v in ablation_choices(cfg).items()]
    if cfg.get("experiment"):
        tags.append(f"experiment={cfg.experiment}")
    # A resumed run logs into the W&B run it started (one curve, one summary), not into a second run
    id_file = Path(run_dir) / "wandb_run_id"
    if resuming is None:
        resuming = cfg.get("resume") not in (None, "", "auto")
    if resuming and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)
        if _rank() == 0:  # the W&B run is rank 0's; the other ranks start later and must not replace its id
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
    return WandbLogger(
        project=cfg.logger.project,
        name=cfg.run_name,
        id=run_id,
        resume="allow",
        group=cfg.logger.group,
        tags=tags + list(cfg.logger.tags),
        save_dir=str(run_dir),
        mode=cfg.logger.mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap is not possible
        return torch.load(path, map_location="cpu", weights_only=False)


def _hpc_checkpoints(run_dir: Path) -> list[Path]:
    """Lightning's SLURM requeue checkpoints in the run folder, ``hpc_ckpt_<n>.ckpt``, by ``n``."""
    def version(p: Path) -> int:
        tail = p.stem.rpartition("_")[2]
        return int(tail) if tail.isdigit() else -1

    return sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt"), key=version)


def run_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """The run folder's states, latest first, as (global step, path): ``last.ckpt`` (the periodic one),
    ``interrupted.ckpt`` (written when training stopped on an exception) and the run folder's latest
    ``hpc_ckpt_<n>.ckpt`` (Lightning's SLURM requeue writes it on the signal); in that order on a tie. A file
    that does not load is left out, with a warning."""
    ckpt_dir = Path(ckpt_dir)
    hpc = _hpc_checkpoints(ckpt_dir.parent)[-1:]
    found = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / InterruptCheckpoint.FILENAME, *hpc) if p.is_file()]
    steps = []
    for i, p in enumerate(found):
        try:
            steps.append((int(_load_checkpoint(p).get("global_step", -1)), -i, p))
        except Exception as error:  # noqa: BLE001 -- a truncated or foreign file: not a state to resume
            log.warning("checkpoint %s does not load (%s: %s); not a state to resume from", p, type(error).__name__,
                        error)
    return [(step, p) for step, _, p in sorted(steps, key=lambda t: t[:2], reverse=True)]


def _resolved(path: str | Path | None) -> Path | None:
    return Path(path).resolve() if path is not None else None


def set_aside_checkpoints(run_dir: str | Path, keep: str | Path | None = None) -> Path | None:
    """Before a run folder trains from the start: move the states an earlier run left there (``checkpoints/``
    and ``hpc_ckpt_*.ckpt``) into ``previous-checkpoints/<time>/``, so that none of them is taken for this run's
    (Lightning's SLURM connector loads an ``hpc_ckpt`` whenever no checkpoint is given, and a ``last.ckpt`` left
    there made this run's own go to ``last-v1.ckpt``, where no resume looks), and none is lost. With ``keep``
    (a run resumed from a state that is not the folder's latest), only the states a resume would look at
    (last.ckpt, interrupted.ckpt, hpc_ckpt_*) go, ``keep`` itself stays. Returns the folder, or None when there
    was nothing to move."""
    run_dir = Path(run_dir)
    if keep is None:
        old = [p for p in (run_dir / "checkpoints",) if p.is_dir() and any(p.iterdir())] + _hpc_checkpoints(run_dir)
    else:
        states = [run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / InterruptCheckpoint.FILENAME,
                  *_hpc_checkpoints(run_dir)]
        old = [p for p in states if p.is_file() and p.resolve() != Path(keep).resolve()]
    if not old:
        return None
    dest = run_dir / "previous-checkpoints" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for p in old:
        p.rename(dest / p.name)
    log.warning("%s: the checkpoints an earlier run left in %s are moved to %s",
                "training from the start" if keep is None else f"resuming from {keep}", run_dir, dest)
    return dest


def newest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The run folder's latest state (:func:`run_checkpoints`), or None."""
    found = run_checkpoints(ckpt_dir)
    return found[0][1] if found else None


def _resume_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint ``resume`` names: null, ``last`` (:func:`newest_checkpoint`, which must exist) or a path;
    ``auto`` is decided by :func:`_auto_resume` once the config is complete."""
    mode = cfg.get("resume")
    if mode in (None, "", "auto"):
        return None
    if mode == "last":
        newest = newest_checkpoint(ckpt_dir)
        if newest is None:
            raise NoCheckpoint(f"resume=last: no checkpoint in {ckpt_dir} (last.ckpt or "
                               f"{InterruptCheckpoint.FILENAME}) nor {ckpt_dir.parent}/hpc_ckpt_*.ckpt")
        return str(newest)
    path = Path(mode)
    if not path.is_file():
        raise NoCheckpoint(f"resume={mode!r}: no checkpoint at {path}")
    return str(path)


def attempts(resume: str | None, updates_per_step: int = 1) -> list[dict[str, Any]]:
    """The run's attempts so far (those the checkpoint it resumes from records; none for a fresh start) and this
    one: when it began, from which step and checkpoint, the command line's overrides (None outside Hydra) and
    the machine and code it runs on (:func:`flamingo_lab.machine.machine`)."""
    before, step = [], 0
    if resume is not None:
        ckpt = _load_checkpoint(resume)
        before, step = list(ckpt.get("attempts") or []), int(ckpt.get("global_step", 0)) // updates_per_step
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started by Hydra (a test, a notebook)
        overrides = None
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    now = {"started": started, "from_step": step, "checkpoint": resume, "overrides": overrides, "machine": machine()}
    # plain types only (torch's version string is a str subclass): Lightning loads checkpoints weights_only
    return [*before, json.loads(json.dumps(now, default=str))]


def _auto_resume(container: dict, ckpt_dir: Path, fingerprint: str | None, updates_per_step: int = 1) -> str | None:
    """``resume=auto``: the run folder's latest checkpoint that was trained with this config on this data (an
    older one of this run when the latest is another config's, left by an earlier run in the folder); None, with
    the reasons logged, when there is none (the run trains from the start)."""
    reasons = []
    for step, path in run_checkpoints(ckpt_dir):
        try:
            check_resume(container, str(path), data_fingerprint=fingerprint, unknown_data="refuse")
        except ResumeRefused as refused:
            reasons.append(str(refused))
            continue
        except FileNotFoundError as gone:  # moved aside meanwhile (another rank of a torchrun / srun launch)
            reasons.append(f"{path} is gone ({gone})")
            continue
        log.info("resuming the run in %s from step %d (%s; resume=null trains from the start)", ckpt_dir.parent,
                 step // updates_per_step, path)
        return str(path)
    for reason in reasons:
        log.warning("not resumed, trained from the start: %s", reason)
    return None


class ResumeRefused(ValueError):
    """``resume=`` cannot continue that checkpoint as asked; nothing in the run folder is touched."""


class NoCheckpoint(ResumeRefused, FileNotFoundError):
    """``resume=`` names no checkpoint file."""


#: Settings a resumed run may change from those its checkpoint was trained with: how long it trains (and the
#: validation point that follows max_steps), what it shows and logs, what it evaluates at the end.
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.val_check_interval", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "eval", "logger", "resume", "force")


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config containers."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(before) | set(now), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in before or k not in now:
                out.append(key)
            else:
                out += _differences(before[k], now[k], key)
        return out
    return [] if before == now else [prefix]


def check_resume(container: dict, ckpt_path: str, force: bool = False, data_fingerprint: str | None = None,
                 unknown_data: str = "warn") -> None:
    """Refuse (:class:`ResumeRefused`) to resume a checkpoint trained with another config, naming the settings
    that differ (:data:`RESUME_MAY_CHANGE` may), or on other data than ``data_fingerprint`` (the world at
    ``data.root`` rewritten since; checkpoints record it from this version on). The optimiser's and scheduler's
    states come from the checkpoint, so a changed ``optim.lr`` would be ignored silently, and a changed model,
    data or seed would train a run that is neither the old config nor the new one. ``force=true`` resumes anyway,
    with a warning. A checkpoint that records no fingerprint is resumed with a warning, or refused with
    ``unknown_data="refuse"`` (``resume=auto``)."""
    ckpt = _load_checkpoint(ckpt_path)
    max_steps = int(((container.get("trainer") or {}).get("max_steps")) or -1)
    if max_steps >= 0:
        ups = updates_per_step(container.get("data") or {})
        at = int(ckpt.get("global_step", 0))
        if at > max_steps * ups:  # it would train nothing and be reported as a run of max_steps
            raise ResumeRefused(f"resume: {ckpt_path} is at step {at // ups}, past trainer.max_steps={max_steps}: "
                                f"resume it with trainer.max_steps>={at // ups}, or train a run of {max_steps} steps "
                                f"from the start (resume=null)")
    was = ckpt.get("data_fingerprint")
    if data_fingerprint is not None and was is not None and was != data_fingerprint:
        _refuse(f"resume: {ckpt_path} was trained on other data than data.root now holds "
                f"({(container.get('data') or {}).get('root')}: fingerprint {was} -> {data_fingerprint}; the world "
                f"was rewritten there with other settings since). Its streams' positions and weights belong to the "
                f"old data: start a new run folder (or train this one from the start with resume=null), or write the "
                f"new world into another folder", force)
    elif data_fingerprint is not None and was is None:
        message = (f"resume: {ckpt_path} records no fingerprint of the data it was trained on (written before "
                   f"checkpoints did), so whether data.root still holds that data cannot be checked")
        if unknown_data == "refuse":
            raise ResumeRefused(message + "; resume=last resumes it all the same")
        log.warning(message)
    before = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(before, dict):
        log.warning("resume: %s holds no run config; cannot check that it was trained with this one", ckpt_path)
        return
    was_strategy, strategy = ((c.get("trainer") or {}).get("strategy") for c in (before, container))
    if strategy == SHARDED and was_strategy != SHARDED:  # force=true or not: it would stop inside Lightning
        raise ResumeRefused(f"resume: {ckpt_path} was written under trainer.strategy={was_strategy}, and a sharded "
                            f"run (trainer=fsdp) cannot continue it: Lightning's FSDP2 loader reads the optimiser "
                            f"state in the model's parameter order, which this checkpoint's is not in (it stops with "
                            f"'Missing optimizer state'). Resume it under its own strategy, or start a new run "
                            f"folder (a sharded run's checkpoint does continue under DDP, with force=true)")
    changed = [k for k in _differences(before, container)
               if not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)
               and not _added_at_backward_default(k, before, container)]
    if not changed:
        return
    shown = "; ".join(f"{k}: {OmegaConf.select(OmegaConf.create(before), k, default=None)!r} -> "
                      f"{OmegaConf.select(OmegaConf.create(container), k, default=None)!r}" for k in changed[:12])
    _refuse(f"resume: {ckpt_path} was trained with another config ({len(changed)} setting(s) differ: {shown}). "
            f"A resumed run continues the checkpoint's optimiser, schedule and data streams; only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change. Resume with the checkpoint's settings, start a new run "
            f"folder for the new ones, or force=true to resume anyway", force)


def _added_at_backward_default(key: str, before: dict, now: dict) -> bool:
    """A setting added since the checkpoint was written, at the value that computes what it computed."""
    if key not in KEY_BACKWARD_DEFAULTS:
        return False
    missing, default = object(), KEY_BACKWARD_DEFAULTS[key]
    value = OmegaConf.select(OmegaConf.create(now), key, default=missing)
    return (OmegaConf.select(OmegaConf.create(before), key, default=missing) is missing and value == default
            and type(value) is type(default))  # as config_key: False is no 0


def _refuse(message: str, force: bool) -> None:
    if not force:
        raise ResumeRefused(message)
    log.warning("%s (force=true: resuming anyway)", message)


#: Settings that do not change what a run computes: a complete results.json still counts when only these differ.
KEY_IGNORED = ("force", "resume", "logger")
#: Settings added after runs were made, at the value that computes what those runs computed (the key did not
#: exist then): left out of the config key at that value, so a complete run made before the setting existed
#: still counts (as world.BACKWARD_DEFAULTS does for the world).
KEY_BACKWARD_DEFAULTS = {"model.resampler.spatial_emb": False, "model.vision.cache_mib": 0,
                         "data.round_robin_step": "update", "pretrain.data_root": None,
                         "data.video_weight": 0.03, "data.video_batch_ratio": 0.25}


def data_fingerprint(root: str | Path) -> str | None:
    """The identity of the data at ``root``: a world's :func:`~flamingo_lab.pretrain.cache.world_fingerprint`
    (its generating config and format), or for a ``flamingo-import`` folder or a manifest of real shards a
    hash of its tasks (their kinds, metrics, shards and counts) and its training shard lists; None where ``root`` holds no finished manifest yet.

    The train config names the data only by its folder: a world rewritten in place with other settings
    (``flamingo-data world.position_words=...``) must not let the runs made on the old one count as done.
    """
    from flamingo_lab.pretrain.cache import world_fingerprint

    path = Path(root) / "world.json"
    try:
        text = path.read_text()
        manifest = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config", {}), dict):
        return hashlib.sha256(text.encode()).hexdigest()[:16]  # no manifest: the run fails reading it, keyed all the same
    if "config" in manifest:
        return world_fingerprint(manifest)
    blob = {"format": manifest.get("format"), "tasks": manifest.get("tasks")}
    if "shards" in manifest:  # a hand-written manifest of real training shards: which shards it trains on
        blob["shards"] = manifest["shards"]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_key(cfg: DictConfig) -> str:
    """Hash of the resolved config less :data:`KEY_IGNORED`, taken before the pretraining stages fill in
    their paths, and of the data at ``data.root`` (:func:`data_fingerprint`): a run is skipped only when its
    results.json was written for the same key."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in KEY_IGNORED:
        container.pop(key, None)
    root = (container.get("data") or {}).get("root")
    container["data_fingerprint"] = data_fingerprint(root) if root else None
    pretrain_root = (container.get("pretrain") or {}).get("data_root")
    if pretrain_root:  # the stages' own world (absent otherwise: runs made before the setting keep their keys)
        container["pretrain_data_fingerprint"] = data_fingerprint(pretrain_root)
    data = container.get("data")
    if isinstance(data, dict):
        if data.get("optimisation", "accumulate") == "round_robin":
            # what a step is enters the key: a round-robin run made before the setting (one update a step) trains
            # again; `update` gives the key it had (KEY_BACKWARD_DEFAULTS)
            data.setdefault("round_robin_step", "cycle")
        else:
            data.pop("round_robin_step", None)  # means nothing when accumulating: those runs keep their keys
    for dotted, value in KEY_BACKWARD_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        node = container
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == value and type(node[leaf]) is type(value):
            del node[leaf]
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(run_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The results of ``run_dir`` if they are complete and were computed for config ``key``, else None."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") == "complete" and results.get("config_key") == key:
        return results
    return None


class RunFolderBusy(RuntimeError):
    """Another live process is running in this run folder (it holds ``RUN_LOCK``)."""


#: Held (fcntl, exclusive) by the process that runs in a folder; the OS drops it when that process ends.
RUN_LOCK = ".run.lock"


def _lock_run_folder(run_dir: Path):
    """Take the run folder's lock, or raise :class:`RunFolderBusy` naming the process that holds it.

    Two runs in one folder would overwrite each other's checkpoints and results (a second sweep on the same
    ``out``, or the workers of a sweep whose parent was killed). Returns the open lock file (keep it open)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / RUN_LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunFolderBusy(
            f"{run_dir} is in use by another run (pid {holder}): wait for it to finish or stop that process "
            "(a sweep's joblib workers too: `pkill -f loky`), or give this run another folder"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def run(cfg: DictConfig, run_dir: str | Path, catch: bool = False) -> dict[str, Any]:
    """:func:`train` with a sweep's semantics; returns the results (complete, reused or failed).

    - ``run_dir/results.json`` complete for the same :func:`config_key`: nothing is trained (``force=true``
      trains anyway);
    - an exception: results.json records ``status: failed``, the error and the end of the traceback, and
      the exception is raised again, unless ``catch`` (a multirun: the other rows go on);
    - another live process running in ``run_dir``: :class:`RunFolderBusy`, and nothing in the folder is
      touched (with ``catch``, returned as ``status: busy``).
    """
    run_dir = Path(run_dir)
    started, key = time.perf_counter(), None
    try:
        lock = _lock_run_folder(run_dir) if _rank() == 0 else None
    except RunFolderBusy as busy:
        if not catch:
            raise
        log.error("run not started: %s", busy)
        return {"status": "busy", "experiment": cfg.get("experiment"), "seed": cfg.get("seed"), "error": str(busy)}
    try:
        key = config_key(cfg)  # raises when the config does not resolve: recorded like any failure
        if not cfg.get("force", False):
            done = completed(run_dir, key)
            if done is not None:
                log.info("skipped: %s already holds complete results for this config (force=true to rerun)",
                         run_dir / "results.json")
                return done
        return train(cfg, run_dir)
    except SIGTERMException as stopped:  # Lightning's SystemExit() exits 0, as if the run had finished
        log.warning("stopped by SIGTERM; the same command resumes the run from its last state (resume=auto)")
        # 128 + SIGTERM, as a shell reports a process the signal ended; by rank 0 alone: Lightning's launcher
        # SIGKILLs every rank when one of the ranks it launched exits non-zero (rank 0 still writing its results)
        raise SystemExit(143 if _rank() == 0 else 0) from stopped
    except Exception as error:
        results = failed_results(cfg, error, key, time.perf_counter() - started)
        _finish_wandb(results)
        if isinstance(error, ResumeRefused):  # nothing was trained: the folder's results.json stays as it was
            if not catch:
                raise
            log.error("run not resumed: %s", error)
            return results
        if _rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / "results.json", results)
        if not catch:
            raise
        log.error("run failed (recorded in %s, the other runs go on): %s\n%s",
                  run_dir / "results.json", results["error"], results["traceback"])
        return results
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def failed_results(cfg: DictConfig, error: BaseException, key: str | None, wall: float) -> dict[str, Any]:
    """results.json of a failed run: what it was, the error and the last lines of its traceback."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # the failure may be the config itself (an interpolation that does not resolve)
        container = OmegaConf.to_container(cfg, resolve=False)
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines).splitlines()[-40:]
    return {
        "status": "failed",
        "experiment": cfg.get("experiment"),
        "seed": cfg.get("seed"),
        "run_name": OmegaConf.select(cfg, "run_name", default=None, throw_on_resolution_failure=False),
        "ablation": _safe(ablation_choices, cfg, {}),
        "error": f"{type(error).__name__}: {error}",
        "traceback": "\n".join(tail),
        "config_key": key,
        "wall_time_s": wall,
        "machine": machine(),
        "config": container,
    }


def _safe(fn, cfg, default):
    try:
        return fn(cfg)
    except Exception:
        return default


def _rank() -> int:
    """This process's global rank before Lightning's strategy sets up, as Lightning reads it (``RANK``; a process
    its launcher started, ``LOCAL_RANK``; one task of srun, ``SLURM_PROCID``; LSF's ``JSM_NAMESPACE_RANK``)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _finish_wandb(failed: dict[str, Any]) -> None:
    """Close the W&B run a failure left open (so the next run of a multirun does not log into it), with
    the failed results in its summary as a complete run has them (flamingo_lab.analysis.load_wandb)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.run.summary["status"] = "failed"
            wandb.run.summary["results"] = json.dumps({k: v for k, v in failed.items() if k != "config"}, default=str)
            wandb.finish(exit_code=1)
        except Exception as e:  # never hide the run's own error behind a logging one
            log.warning("could not close the W&B run: %s", e)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train the Flamingo described by ``cfg``, write ``run_dir/results.json`` and return its content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = config_key(cfg)  # before the pretraining stages point cfg at their weights
    ckpt_dir = run_dir / "checkpoints"
    resume = _resume_path(cfg, ckpt_dir)
    pretrained = ensure_pretrained(cfg)  # builds or reuses the cached LM / vision stages; points cfg at them
    container = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = data_fingerprint(cfg.data.root)
    ups = updates_per_step(container["data"])  # round robin: a step is one update per source (data.round_robin_step)
    if cfg.get("resume") == "auto" and not cfg.get("force", False):  # resume when it can, else from the start
        resume = _auto_resume(container, ckpt_dir, fingerprint, ups)
    elif resume is not None:
        check_resume(container, resume, force=bool(cfg.get("force", False)), data_fingerprint=fingerprint)
    if _rank() == 0 and (resume is None or Path(resume).resolve() != _resolved(newest_checkpoint(ckpt_dir))):
        # from the start, or from a state that is not the folder's latest (resume=<path>): the folder's other
        # states go aside, or a later resume=auto would take the abandoned run's later one for this run's
        set_aside_checkpoints(run_dir, keep=resume)
    # seeded after the stages: a stage built in this process draws from (and reseeds) the global RNG, and the
    # Flamingo's initialisation must be the same whether its stages were built now or found in the cache
    pl.seed_everything(int(cfg.seed), workers=True)

    module = FlamingoModule(container)
    datamodule = FlamingoDataModule(container)
    counts = module.model.parameter_counts()
    log.info("parameters: %s", json.dumps(counts))

    every = int(cfg.trainer.log_every_n_steps)
    accumulate = int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1)
    timer, gates, history = StepTimer(), GateLogger(every, ups), LossHistory(every, ups, accumulate)
    curve = make_eval_curve(cfg, ups)
    # no version counter: a state is always last.ckpt (set_aside_checkpoints moves an earlier run's away first)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=max(every, 50) * ups,
                                 enable_version_counter=False)
    together = StopTogether()
    interrupted = InterruptCheckpoint(ckpt_dir / InterruptCheckpoint.FILENAME, together)
    record = RunRecord(fingerprint, attempts(resume, ups), last_path=str(ckpt_dir / "last.ckpt"))
    logger = make_logger(cfg, run_dir, resuming=resume is not None)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if ups > 1 and trainer_kwargs.get("max_steps", -1) > 0:
        trainer_kwargs["max_steps"] *= ups  # Lightning counts optimiser updates
    interval = trainer_kwargs.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        # counted in steps (${.max_steps}: at the end), where Lightning counts batches: a step is ups updates of
        # accumulate_grad_batches batches each (before, round robin validated S times, accumulation k times)
        trainer_kwargs["val_check_interval"] = interval * ups * accumulate
    trainer = pl.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=[together, record, timer, gates, history, checkpoint, *([curve] if curve else []), interrupted],
        default_root_dir=str(run_dir),
    )
    check_strategy(trainer)
    if logger:
        logger.log_hyperparams({"params": counts})

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    wall = time.perf_counter() - started
    cache = module.model.vision.cache
    cache_after_training = cache.stats() if cache is not None else None

    results = {
        "status": "complete",
        "experiment": cfg.get("experiment"),
        "seed": int(cfg.seed),
        "config_key": key,
        "run_name": cfg.run_name,
        "ablation": ablation_choices(cfg),
        "params": counts,
        "pretrained": pretrained,
        "steps": trainer.global_step // ups,  # training steps (round robin: each is one update per source)
        "updates": trainer.global_step,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,  # DDPStrategy, FSDP2Strategy (trainer=fsdp), ...
        "step_time_s": {"mean": timer.mean, "median": timer.median, "n": len(timer.times)},
        "loss": history.summary(),
        "gates": module.model.gate_values(),
        "eval_curve": curve.points if curve else None,  # few-shot scores against steps (eval.curve)
        "data": datamodule.skip_counts(),  # samples seen / skipped per source and reason (this rank)
        "wall_time_s": wall,
        "machine": machine(),
        "attempts": record.attempts,  # each start and resume: when, from which step, overrides, machine
        "config": container,
    }
    eval_model = module.model
    if is_sharded(trainer) and OmegaConf.select(cfg, "eval.at_end_of_training", default=True):
        # rank 0 evaluates an unsharded copy (every rank gathers its shards for it): the whole model on rank 0's
        # device beside its shards, as single-process evaluation needs
        eval_model = unsharded_copy(module.model, container["model"], trainer.strategy.root_device)
    if trainer.is_global_zero:
        evaluation = evaluate_at_end(eval_model, cfg, run_dir)
        if cache is not None:  # model.vision.cache_mib: frames served from the cache, in training and in all
            # under trainer=fsdp the unsharded copy evaluated, with a cache of its own: its frames are the evaluation's
            evaluated = eval_model.vision.cache if eval_model is not None and eval_model is not module.model else cache
            results["vision_cache"] = {"training": cache_after_training, "with_evaluation": evaluated.stats()}
            log.info("vision feature cache: %s", json.dumps(results["vision_cache"]))
        if evaluation is not None:
            results["eval"] = evaluation
            results["metrics"] = evaluation["metrics"]
        if logger:
            summary = {"final/train_loss": results["loss"]["final"], "final/val_loss": results["loss"]["val"],
                       "final/step_time_s": timer.mean}
            if evaluation is not None:
                logger.log_metrics(evaluation["metrics"], step=trainer.global_step)
                summary.update(evaluation["metrics"])
            results["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            # the whole results.json (less the config W&B already has), for flamingo_lab.analysis.load_wandb
            summary["results"] = json.dumps({k: v for k, v in results.items() if k != "config"}, default=str)
            logger.experiment.summary.update({k: v for k, v in summary.items() if v is not None})
            logger.experiment.finish()
        _write_json(run_dir / "results.json", results)
        log.info("results: %s", run_dir / "results.json")
    if together.stop_requested or together.signalled:  # in the last batch (on any rank) or after it
        log.warning("SIGTERM came in or after the last step: the run is complete, and stops here (exit 143)")
        raise SIGTERMException()
    return results


def make_eval_curve(cfg: DictConfig, updates_per_step: int = 1) -> EvalCurve | None:
    """The accuracy-against-steps callback when ``eval.curve.every_n_steps`` is set (else None)."""
    curve = OmegaConf.select(cfg, "eval.curve")
    if curve is None or not curve.get("every_n_steps"):
        return None
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    eval_cfg.pop("curve", None)
    return EvalCurve(cfg.data.root, eval_cfg, curve.every_n_steps, curve.get("tasks"), curve.shots, curve.max_items,
                     updates_per_step)


def evaluate_at_end(model, cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Few-shot evaluation of the trained model on the world's tasks (``eval`` config group), or None.

    Skipped (with a log line) when ``eval.at_end_of_training`` is false or the world has no tasks.
    """
    eval_cfg = cfg.get("eval")
    if eval_cfg is None or not eval_cfg.get("at_end_of_training", True):
        return None
    from flamingo_lab.eval import evaluate_model, load_tasks

    root = cfg.data.root
    try:
        has_tasks = bool(load_tasks(root))
    except FileNotFoundError as e:
        log.warning("no evaluation at the end of training: %s", e)
        return None
    if not has_tasks:
        log.warning("no evaluation at the end of training: %s has no tasks (rewrite it with flamingo-data)", root)
        return None
    result = evaluate_model(model, root, OmegaConf.to_container(eval_cfg, resolve=True), out_dir=run_dir / "eval")
    log.info("few-shot evaluation (%.0fs):\n%s", result["wall_time_s"], result["table"])
    return result


def _write_json(path: Path, content: dict) -> None:
    """Write atomically: a reader never sees a half-written results.json."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    tmp.replace(path)
