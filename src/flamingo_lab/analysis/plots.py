"""Plots where a table is not enough: Overall per ablation axis with intervals; loss curves per row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: notebooks and CI
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG, free the figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def overall_labels(table: pd.DataFrame) -> list[str]:
    """plot_overall's row labels: the paper's axis and change, and for a row without an interval, why."""
    labels = []
    for r in table.to_dict("records"):
        label = "baseline" if r["experiment"] == "baseline" else f"{r['group']}: {r['changed_to']}"
        if math.isnan(r["overall"]):
            label += " (no complete seed)"
        elif math.isnan(r["overall_ci"]):
            label += f" ({int(r['seeds'])} seed, no interval)"
        labels.append(label)
    return labels


def plot_overall(table: pd.DataFrame, path: str | Path) -> Path:
    """Horizontal bars of Overall (mean, 95% CI over seeds) per row, grouped by the paper's axis."""
    plt = _plt()
    t = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(t) + 1.2))
    errors = [0 if math.isnan(e) else e for e in t["overall_ci"]]
    colours = ["tab:grey" if e == "baseline" else "tab:blue" for e in t["experiment"]]
    # a row without an interval is hatched and says why: a bar without whiskers would read as an exact result
    hatches = ["//" if math.isnan(e) else "" for e in t["overall_ci"]]
    ax.barh(range(len(t)), t["overall"].fillna(0), xerr=errors, color=colours, capsize=3, hatch=hatches)
    ax.set_yticks(range(len(t)), overall_labels(t), fontsize=8)
    base = table.loc[table["experiment"] == "baseline", "overall"]
    if len(base):
        ax.axvline(float(base.iloc[0]), color="k", lw=0.8, ls="--", label="baseline")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("Overall score (mean ± 95% CI over seeds)")
    return save(fig, path)


def plot_loss_curves(runs: pd.DataFrame, path: str | Path) -> Path:
    """Training-loss curves (results.json ``loss.curve``), one line per experiment (mean over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for exp, group in runs[runs["status"] == "complete"].groupby("experiment"):
        curves = []
        for p in group["path"].dropna():
            curve = json.loads(Path(p).read_text()).get("loss", {}).get("curve") or {}
            if curve.get("step"):
                curves.append(pd.Series(curve["loss"], index=curve["step"]))
        if curves:
            mean = pd.concat(curves, axis=1).mean(axis=1)
            ax.plot(mean.index, mean.values, label=exp, lw=2 if exp == "baseline" else 1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6, ncol=2)
    return save(fig, path)
