"""The training mixture: per-source loaders, the paper's weights, and the two ways to optimise over them.

A data config names its sources, each with a weight lambda and any per-source shape that differs
from the data-level defaults (``batch_size``, ``seq_len``, ``max_images``, ``frames``, ``frame_stride``,
``max_doc_images``); a source set to ``null`` or weight 0 is left out, so a Table 3 row is a
two-line config (``sources: {vtp: null}``)::

    sources:
      m3w:  {weight: 1.0, batch_ratio: 1.0}                 # paper: M3W batch 256, lambda 1.0
      ltip: {weight: 0.2, batch_ratio: 2.0, max_images: 1}  # paper: 512, 0.2
      vtp:  {weight: 0.03, batch_ratio: 0.25, frames: 4}    # paper: 64, 0.03

A source's batch is ``round(data.batch_size * batch_ratio)`` (at least 1) unless it sets ``batch_size``.

``optimisation: accumulate`` (the paper): every update sees one batch of every source and its loss
is ``sum_s lambda_s L_s / sum_s lambda_s``. ``round_robin``: update ``k`` sees only source
``k mod S``, with loss ``lambda_s L_s / mean_s lambda_s`` (same scale on average). Dividing by a
constant leaves AdamW's update unchanged (up to epsilon and clipping) and keeps a logged loss
comparable with ln(vocab).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Mapping

import torch

from flamingo_lab.data.shards import SKIP_REASONS

OPTIMISATIONS = ("accumulate", "round_robin")
ROUND_ROBIN_STEPS = ("cycle", "update")
SHAPE_KEYS = ("seq_len", "max_images", "frames", "frame_stride", "max_doc_images")


def source_specs(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Resolved per-source settings: weight, batch_size and the shape keys, for the sources in use."""
    sources = data.get("sources") or {}
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in sources.items():
        if spec is None:
            continue
        if isinstance(spec, (int, float)):
            spec = {"weight": float(spec)}
        spec = dict(spec)
        unknown = sorted(set(spec) - {"weight", "batch_ratio", "batch_size", *SHAPE_KEYS})
        if unknown:
            raise ValueError(f"data.sources.{name} has unknown keys {unknown}; valid: weight, batch_ratio, "
                             f"batch_size, {', '.join(SHAPE_KEYS)}")
        weight = float(spec.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"data.sources.{name}.weight must be >= 0; got {weight}")
        if weight == 0:
            continue
        out = {"weight": weight}
        if spec.get("batch_size") is not None:
            out["batch_size"] = int(spec["batch_size"])
        else:
            out["batch_size"] = max(1, round(int(data["batch_size"]) * float(spec.get("batch_ratio", 1.0))))
        for k in SHAPE_KEYS:
            v = spec.get(k, data.get(k))
            out[k] = None if v is None else int(v)
        out["frames"] = out["frames"] or 1
        out["frame_stride"] = out["frame_stride"] or 1
        if out["batch_size"] < 1 or out["seq_len"] is None or out["max_images"] is None:
            raise ValueError(f"data.sources.{name}: need batch_size >= 1, seq_len and max_images; got {out}")
        specs[name] = out
    if not specs:
        raise ValueError("data.sources leaves no source with weight > 0: a run needs at least one")
    return specs


def optimisation(data: Mapping[str, Any]) -> str:
    mode = data.get("optimisation", "accumulate")
    if mode not in OPTIMISATIONS:
        raise ValueError(f"data.optimisation must be one of {OPTIMISATIONS}; got {mode!r}")
    return mode


def updates_per_step(data: Mapping[str, Any]) -> int:
    """Optimiser updates in one training step: 1, or with ``round_robin`` and ``round_robin_step: cycle`` (the
    default) one per source, so that a round-robin step sees the same data as an accumulating one (the paper
    times a round-robin step over all datasets, 1.68 s against accumulation's 1.74 s). ``round_robin_step:
    update`` counts single updates, as before the setting existed: a quarter of the data in as many steps."""
    if optimisation(data) != "round_robin":
        return 1
    step = data.get("round_robin_step", "cycle")
    if step not in ROUND_ROBIN_STEPS:
        raise ValueError(f"data.round_robin_step must be one of {ROUND_ROBIN_STEPS}; got {step!r}")
    return len(source_specs(data)) if step == "cycle" else 1


def loss_scale(data: Mapping[str, Any]) -> dict[str, float]:
    """Per source, the factor its loss is multiplied by in the update (see the module docstring)."""
    specs = source_specs(data)
    total = sum(s["weight"] for s in specs.values())
    if optimisation(data) == "round_robin":
        total /= len(specs)
    return {name: s["weight"] / total for name, s in specs.items()}


class RoundRobin:
    """Yields ``{source: batch}`` with one source per step, in turn (an iterable Lightning accepts)."""

    def __init__(self, loaders: dict[str, Any]):
        self.loaders = loaders

    def __iter__(self) -> Iterator[dict[str, Any]]:
        its = {n: iter(dl) for n, dl in self.loaders.items()}
        names = list(its)
        k = 0
        while True:
            name = names[k % len(names)]
            try:
                batch = next(its[name])
            except StopIteration:
                return
            yield {name: batch}
            k += 1


class SkipTally:
    """Samples delivered and skipped per source and reason, summed from the batches' ``skipped`` tensors."""

    def __init__(self, sources, max_share: float | None = None, min_samples: int = 200):
        self.seen: Counter = Counter({s: 0 for s in sources})
        self.skipped: dict[str, Counter] = {s: Counter() for s in sources}
        self.max_share, self.min_samples = max_share, min_samples

    def add(self, source: str, batch: dict) -> None:
        counts = batch.pop("skipped", None)
        self.seen[source] += int(batch["input_ids"].shape[0])
        if counts is not None:
            self.add_skips(source, counts)

    def add_skips(self, source: str, counts) -> None:
        """Adds a ``skipped`` tensor (..., R) without delivered samples."""
        totals = counts.reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
        for reason, n in zip(SKIP_REASONS, totals):
            if n:
                self.skipped.setdefault(source, Counter())[reason] += int(n)

    def share(self, source: str) -> float:
        bad = sum(self.skipped[source].values())
        return bad / max(1, bad + self.seen[source])

    def check(self) -> None:
        """Stop the run with a clear message when a source skips more than ``max_share`` of its samples."""
        if self.max_share is None:
            return
        for s in self.seen:
            bad = sum(self.skipped[s].values())
            if bad + self.seen[s] >= self.min_samples and self.share(s) > self.max_share:
                raise RuntimeError(
                    f"source {s!r}: {bad} of {bad + self.seen[s]} samples skipped ({self.share(s):.1%}), more than "
                    f"data.max_skip_share={self.max_share:.1%}; reasons {dict(self.skipped[s])}. Fix or drop its "
                    "shards (the warnings above name them), or raise data.max_skip_share"
                )

    def as_dict(self) -> dict:
        per = {
            s: {"seen": int(self.seen[s]), "skipped": dict(self.skipped[s]),
                "skipped_total": sum(self.skipped[s].values()), "share": round(self.share(s), 6)}
            for s in self.seen
        }
        return {"per_source": per, "skipped_total": sum(p["skipped_total"] for p in per.values()),
                "seen_total": sum(p["seen"] for p in per.values()), "max_share": self.max_share}
