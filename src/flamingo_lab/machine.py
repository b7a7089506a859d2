"""Where and with what code a result was computed: recorded in every run's results.json and every pretraining
stage's report.json (never in a config key). The same config computes other numbers on a CPU whose torch
kernels use other vector instructions (float sums in another order), so two results are comparable only
where this says they ran alike (README, The Table 3 study)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What a run's numbers may depend on beyond its config: the platform, torch and its CPU kernels (the
    vector instructions it dispatches to change float sums, so the same config can score differently on
    another CPU), the processor, the threads, the GPU, and the code's git commit (``dirty``: with changes not
    committed; None outside a git checkout)."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 -- older torch
        capability = None
    return {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu": cpu, "cpu_capability": capability, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "code": code_version()}


def code_version() -> dict[str, Any] | None:
    """The git commit of the checkout this package runs from, and whether it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
