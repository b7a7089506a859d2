"""One row looked at closely: per question type against chance and the majority answer, the
text-description control beside the image score, and few-shot accuracy against training steps.

This is where a failure is located: a group at chance with the text control high points at the
vision encoder or the cross-attention; both low points at the LM or the prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .stats import mean_ci


def _results(runs: pd.DataFrame, experiment: str) -> list[dict[str, Any]]:
    rows = runs[(runs["experiment"] == experiment) & (runs["status"] == "complete")]
    return [json.loads(Path(p).read_text()) for p in rows["path"].dropna()]


def _group_entries(by_k: dict, k: str) -> dict[str, dict]:
    """``{"all": {...}, "qtype=colour": {...}, ...}`` of one task's result at ``k`` shots."""
    res = by_k.get(k) if isinstance(by_k, dict) else None
    if not isinstance(res, dict) or "score" not in res:
        return {}
    return {"all": {"score": res["score"], "n": res.get("n")}, **(res.get("breakdown") or {})}


def breakdown_table(runs: pd.DataFrame, experiment: str = "baseline", shots: tuple[int, ...] = (0, 4),
                    control: str = "text") -> pd.DataFrame:
    """Per task and group (all items, each question type, held-out or not): the score at each k
    (mean and 95% CI over seeds), chance, the majority answer, and the ``control`` score at the
    largest k, where the runs have one (``eval.controls``)."""
    results = _results(runs, experiment)
    if not results:
        raise ValueError(f"no complete run of {experiment!r} among {sorted(runs['experiment'].unique())}")
    top = str(max(shots))
    records: dict[tuple[str, str], dict[str, list]] = {}
    for res in results:
        ev = res.get("eval") or {}
        ctl = (ev.get("controls") or {}).get(control) or {}
        for task, by_k in (ev.get("scores") or {}).items():
            for k in map(str, shots):
                for group, entry in _group_entries(by_k, k).items():
                    rec = records.setdefault((task, group), {})
                    rec.setdefault(f"{k}-shot", []).append(entry["score"])
                    rec.setdefault("n", []).append(entry.get("n"))
                    if k == top:
                        for extra in ("chance", "majority"):
                            if extra in entry:
                                rec.setdefault(extra, []).append(entry[extra])
            for group, entry in _group_entries(ctl.get(task) or {}, top).items():
                records.setdefault((task, group), {}).setdefault(f"{control} control", []).append(entry["score"])
    rows = []
    for (task, group), rec in records.items():
        row: dict[str, Any] = {"task": task, "group": group, "seeds": len(rec.get(f"{top}-shot", [])),
                               "n": rec["n"][0] if rec.get("n") else None}
        for col in [*(f"{k}-shot" for k in shots), f"{control} control", "chance", "majority"]:
            mean, half, _ = mean_ci(rec.get(col, []))
            row[col], row[f"{col} ci"] = mean, half
        rows.append(row)
    order = {t: i for i, t in enumerate(dict.fromkeys(t for t, _ in records))}
    out = pd.DataFrame(rows)
    out["_t"] = out["task"].map(order)
    out["_g"] = out["group"].map(lambda g: (g != "all", g))
    return out.sort_values(["_t", "_g"]).drop(columns=["_t", "_g"]).reset_index(drop=True)


def breakdown_markdown(table: pd.DataFrame, shots: tuple[int, ...] = (0, 4), control: str = "text") -> str:
    """The breakdown as a markdown table (mean ± 95% CI where there are two seeds or more)."""
    def cell(mean, half):
        if mean is None or pd.isna(mean):
            return "–"
        return f"{mean:.1f}" if half is None or pd.isna(half) else f"{mean:.1f} ± {half:.1f}"

    cols = [*(f"{k}-shot" for k in shots), f"{control} control", "chance", "majority"]
    head = ["task", "group", "n", "seeds", *cols, f"{max(shots)}-shot − chance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        top = r[f"{max(shots)}-shot"]
        gap = "–" if pd.isna(r["chance"]) else f"{top - r['chance']:+.1f}"
        cells = [r["task"], r["group"], "–" if pd.isna(r["n"]) else str(int(r["n"])), str(r["seeds"]),
                 *(cell(r[c], r[f"{c} ci"]) for c in cols), gap]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_frame(runs: pd.DataFrame, experiment: str = "baseline") -> pd.DataFrame:
    """``eval_curve`` points of every seed of ``experiment`` as rows: seed, step, task, k, group, score."""
    rows = []
    for res in _results(runs, experiment):
        seed = (res.get("config") or {}).get("seed", res.get("seed"))
        for point in res.get("eval_curve") or []:
            for task, by_k in point["scores"].items():
                for k, entry in by_k.items():
                    rows.append({"seed": seed, "step": point["step"], "task": task, "k": int(k), "group": "all",
                                 "score": entry["score"]})
                    for group, sub in (entry.get("breakdown") or {}).items():
                        if group.startswith("qtype="):
                            rows.append({"seed": seed, "step": point["step"], "task": task, "k": int(k),
                                         "group": group, "score": sub["score"]})
    return pd.DataFrame(rows, columns=["seed", "step", "task", "k", "group", "score"])


def plot_eval_curve(runs: pd.DataFrame, path: str | Path, experiment: str = "baseline") -> Path | None:
    """Few-shot score against training steps (mean over seeds), a panel per curve task, a line per
    k and question type; None when the runs recorded no curve (``eval.curve.every_n_steps``)."""
    frame = curve_frame(runs, experiment)
    if frame.empty:
        return None
    from .plots import _plt, save

    plt = _plt()
    tasks = list(dict.fromkeys(frame["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = frame[frame["task"] == task]
        for (k, group), g in sub.groupby(["k", "group"]):
            mean = g.groupby("step")["score"].mean()
            label = f"{k}-shot" + ("" if group == "all" else f" {group.split('=', 1)[1]}")
            ax.plot(mean.index, mean.values, marker="o", ms=3, lw=2 if group == "all" else 1,
                    ls="-" if k else ":", label=label)
        ax.set(title=f"{experiment}: {task}", xlabel="optimiser step", ylabel="score")
        ax.legend(fontsize=7, ncol=2)
    return save(fig, path)
