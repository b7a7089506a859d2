"""A cache of pretrained parts, keyed by the config that produced them.

Every row of a sweep that needs the same pretrained LM or vision encoder reuses one folder:
``<cache_root>/<stage>-<key>/`` where ``key`` hashes the stage's config, the world it learned from
and a format version. ``report.json`` is written last: a folder without it is incomplete and is
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
REPORT = "report.json"


def world_fingerprint(world: dict) -> str:
    """The identity of a world: its format and generating config (same seed and sizes -> same shards).

    A key added to the config later is left out at the value that writes the same world as before it
    existed (``world.BACKWARD_DEFAULTS``): a world written before and one written after have one identity.
    How it was written (``world.WRITE_SETTINGS``: the number of processes) is no part of it.
    """
    from flamingo_lab.data.world import world_identity

    blob = {"config": world_identity(world["config"]), "format": world.get("format")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def stage_key(stage: str, cfg: dict[str, Any], world: dict | None = None) -> str:
    blob = {"stage": stage, "cfg": cfg, "world": world_fingerprint(world) if world else None,
            "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_dir(cache_root: str | Path, stage: str, cfg: dict, world: dict | None = None) -> Path:
    return Path(cache_root).resolve() / f"{stage}-{stage_key(stage, cfg, world)}"


def is_complete(folder: Path) -> bool:
    return (folder / REPORT).is_file()


def read_report(folder: Path) -> dict:
    return json.loads((folder / REPORT).read_text())


def begin(folder: Path) -> Path:
    """A fresh temporary folder beside ``folder`` to build into (an interrupted build leaves no half cache)."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, folder: Path, report: dict) -> Path:
    """Write the report last, then move the built folder into place."""
    (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
