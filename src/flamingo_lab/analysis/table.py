"""A sweep's results.json files -> a tidy DataFrame -> Flamingo's Table 3 with intervals over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .paper import PAPER_TABLE3, ROW_ORDER, TASKS
from .stats import diff_ci, mean_ci

#: Columns of the tidy frame that Table 3 summarises (one row per run).
METRICS = ["params", "step_time", *TASKS, "overall"]


def flatten_results(results: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """One results.json -> one tidy row: experiment, seed, status, params, step time, task scores, overall."""
    cfg = results.get("config", {})
    ev = results.get("eval") or {}
    shots = str(ev.get("overall_shots", 4))
    row = {
        "experiment": results.get("experiment") or cfg.get("experiment") or "baseline",
        "seed": cfg.get("seed", results.get("seed")),
        # no status: not a training run's results (flamingo-eval writes none), never counted as a complete run
        "status": results.get("status", "unknown"),
        "error": results.get("error"),
        "params": (results.get("params") or {}).get("total"),
        "step_time": (results.get("step_time_s") or {}).get("median"),
        "overall": ev.get("overall_score"),
        # what the Overall averages: runs are comparable only when these agree (table3 checks)
        "overall_tasks": _task_set(ev.get("overall_tasks_used", ev.get("overall_tasks"))),
        "overall_shots": ev.get("overall_shots"),
        "final_loss": (results.get("loss") or {}).get("final"),
        "path": path,
    }
    for task in TASKS:  # eval.scores[task][k] = {"metric", "score", ...} at the headline k shots
        by_k = (ev.get("scores") or {}).get(task) or {}
        entry = by_k.get(shots, by_k.get(int(shots))) if isinstance(by_k, dict) else None
        row[task] = entry.get("score") if isinstance(entry, dict) else entry
    for key, value in (results.get("ablation") or {}).items():
        row[f"ablation.{key}"] = value
    return row


def _task_set(tasks) -> str | None:
    return ",".join(sorted(tasks)) if tasks else None


def _check_same_overall(done: pd.DataFrame) -> None:
    """Stop when the runs' Overalls average different tasks or shots: their mean and deltas would compare
    unlike things (a row evaluated with other eval.tasks, or a task with no reference in some runs)."""
    scored = done[done["overall"].notna()] if "overall" in done else done.iloc[:0]
    kinds = {}
    for _, r in scored.iterrows():
        key = (r.get("overall_tasks"), r.get("overall_shots"))
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in key):
            continue  # results written before these were recorded: nothing to compare
        kinds.setdefault(key, []).append(f"{r['experiment']} seed {r['seed']:g}")
    if len(kinds) > 1:
        lines = "; ".join(f"tasks [{t}] at {int(k)} shots: {', '.join(runs[:4])}{' ...' if len(runs) > 4 else ''}"
                          for (t, k), runs in sorted(kinds.items(), key=lambda kv: -len(kv[1])))
        raise ValueError(
            f"the runs' Overall scores average different things ({lines}), so their means and the deltas "
            "against the baseline would compare unlike scores. Evaluate every run with the same eval.tasks, "
            "eval.overall_tasks and eval.overall_shots (flamingo-eval checkpoint=<run folder> ...), or give "
            "the tasks that lack one a reference")


def load_runs(folder: str | Path, paths: list[str | Path] | None = None) -> pd.DataFrame:
    """Every ``results.json`` under ``folder`` (a sweep or a single run), or those ``paths``, one row each."""
    folder = Path(folder)
    paths = sorted(folder.rglob("results.json")) if paths is None else [Path(p) for p in paths]
    if not paths:
        raise FileNotFoundError(f"no results.json under {folder}: is it a sweep or run folder?")
    rows = [flatten_results(json.loads(p.read_text()), str(p)) for p in paths]
    return pd.DataFrame(rows)


def load_wandb(project: str, group: str | None = None, api=None) -> pd.DataFrame:
    """The same tidy frame from a W&B project (runs' ``results`` summary written by flamingo-train)."""
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": group} if group else None
    rows = []
    for run in api.runs(project, filters=filters):
        results = run.summary.get("results")
        if isinstance(results, str):
            results = json.loads(results)
        if results:
            rows.append(flatten_results(dict(results), run.url))
    if not rows:
        raise LookupError(f"no runs with a results summary in W&B project {project!r} (group {group!r})")
    return pd.DataFrame(rows)


def table3(runs: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Per experiment: mean and 95% half-width of every metric over seeds, the paper's numbers,
    the change from the baseline (ours with its interval, the paper's) and whether they agree."""
    done = runs[runs["status"] == "complete"]
    twice = done[done.duplicated(["experiment", "seed"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise ValueError(
            f"{len(twice)} complete results.json files share an (experiment, seed): "
            f"{first['experiment']} seed {first['seed']:g} in {sorted(twice[twice['experiment'] == first['experiment']]['path'].astype(str))}. "
            "A seed counted twice would narrow the interval: remove the stale copies, or render a sweep with "
            "flamingo-sweep, which reads only its own rows' and seeds' folders")
    _check_same_overall(done)
    base = done[done["experiment"] == baseline]
    out = []
    order = [e for e in ROW_ORDER if e in set(runs["experiment"])]  # rows whose every seed failed stay, as failed
    order += sorted(set(runs["experiment"]) - set(order))
    for exp in order:
        group = done[done["experiment"] == exp]
        paper = PAPER_TABLE3.get(exp, {})
        row: dict[str, Any] = {
            "experiment": exp,
            "group": paper.get("group", ""),
            "changed_to": "baseline" if exp == baseline else paper.get("changed_to", exp),
            # the seeds behind the Overall (a complete run without an Overall is not one of them)
            "seeds": int(group["overall"].notna().sum()) if "overall" in group else len(group),
            "failed": int((~runs[runs["experiment"] == exp]["status"].isin(["complete", "unknown"])).sum()),
        }
        for m in METRICS:
            mean, half, _ = mean_ci(group[m].dropna().tolist()) if m in group else (math.nan, math.nan, 0)
            row[m], row[f"{m}_ci"] = mean, half
            row[f"paper_{m}"] = paper.get(m)
        if exp != baseline and len(base):
            delta, half = diff_ci(group["overall"].dropna().tolist(), base["overall"].dropna().tolist())
            p_delta = (paper.get("overall") - PAPER_TABLE3[baseline]["overall"]) if paper.get("overall") else None
            row.update(delta=delta, delta_ci=half, paper_delta=p_delta)
            # the paper's way: same sign as the paper's change (no change at all does not count as agreeing)
            row["agrees"] = None if p_delta is None or math.isnan(delta) or delta == 0 else (delta * p_delta > 0)
            row["significant"] = None if math.isnan(half) else abs(delta) > half
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, half: float, digits: int = 1) -> str:
    if _missing(mean):
        return "–"
    if _missing(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _paper(value, digits=1) -> str:
    return "–" if _missing(value) else f"{value:.{digits}f}"


def _yes_no(value) -> str:
    return "–" if _missing(value) else ("yes" if bool(value) else "no")


def render_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """Table 3 as display strings: ours (mean ± 95% CI) then the paper's number, per column."""
    rows = []
    for r in table.to_dict("records"):
        cells = {
            "group": r["group"],
            "changed to": r["changed_to"],
            "seeds": str(r["seeds"]) + (f" (+{r['failed']} failed)" if r["failed"] else ""),
            "params (M)": _pm(r["params"] / 1e6 if r["params"] == r["params"] else math.nan, math.nan, 2),
            "paper params (B)": _paper(r["paper_params"]),
            "step (ms)": _pm(r["step_time"] * 1e3, r["step_time_ci"] * 1e3, 0),
            "paper step (s)": _paper(r["paper_step_time"], 2),
        }
        for t in TASKS:
            cells[t] = f"{_pm(r[t], r[f'{t}_ci'])} ({_paper(r[f'paper_{t}'])})"
        cells["overall"] = f"{_pm(r['overall'], r['overall_ci'])} ({_paper(r['paper_overall'])})"
        if not _missing(r.get("delta")):
            cells["Δ overall"] = f"{_pm(r['delta'], r['delta_ci'])} ({_paper(r['paper_delta'])})"
            cells["paper's way"], cells["CI excludes 0"] = _yes_no(r.get("agrees")), _yes_no(r.get("significant"))
        else:
            cells["Δ overall"], cells["paper's way"], cells["CI excludes 0"] = "–", "–", "–"
        rows.append(cells)
    return rows


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown Table 3: each cell is ours (mean ± 95% CI over seeds) with the paper's value in brackets."""
    rows = render_rows(table)
    if not rows:
        return "(no complete runs)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame) -> str:
    return pd.DataFrame(render_rows(table)).to_html(index=False, escape=True)
