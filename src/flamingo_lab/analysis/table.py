"""A sweep's results.json files -> a tidy DataFrame -> Flamingo's Table 3 with intervals over seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from .paper import PAPER_TABLE3, ROW_ORDER, TASKS
from .stats import diff_ci, mean_ci

#: Columns of the tidy frame that Table 3 summarises (one row per run).
METRICS = ["params", "step_time", *TASKS, "overall"]

#: Where ``benchmarks/row_step_times.py --out <sweep>/step_times.md`` leaves its measurement for the table.
STEP_TIMES_FILE = "step_times.json"


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


def load_step_times(sweep_dir: str | Path) -> dict | None:
    """The step times ``benchmarks/row_step_times.py`` measured with each row alone, left in ``sweep_dir`` as
    :data:`STEP_TIMES_FILE` (``--out <sweep_dir>/step_times.md``); None when the folder has none.

    The study trains runs side by side (and anything else on the machine slows them), so the step time each run
    records carries that load; :func:`table3` takes its step column from this file when there is one."""
    path = Path(sweep_dir) / STEP_TIMES_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    times = data.get("times_s")
    if not isinstance(times, dict) or not all(isinstance(v, list) and v for v in times.values()):
        raise ValueError(f"{path}: no per-row list of step times under 'times_s'; it was not written by "
                         "benchmarks/row_step_times.py: rerun the benchmark with --out, or delete the file")
    if "baseline" not in times:
        raise ValueError(f"{path}: no baseline among its rows ({sorted(times)}), so its ratios have no base: "
                         "rerun benchmarks/row_step_times.py (it always times the baseline)")
    return data


def _use_step_times(rows: list[dict[str, Any]], step_times: dict, baseline: str = "baseline") -> None:
    """Each row's step column from the benchmark (median of its runs alone, ratio to the baseline measured in the
    same invocation, slowest over fastest run); the runs' own mean stays as ``step_time_runs``."""
    times = step_times["times_s"]
    if baseline not in times:
        raise ValueError(f"the step times measured alone hold no {baseline!r} row ({sorted(times)}), so the "
                         "ratios have no base: rerun benchmarks/row_step_times.py with it")
    base = statistics.median(times[baseline])
    for row in rows:
        row["step_time_runs"], row["step_time_runs_ci"] = row["step_time"], row["step_time_ci"]
        ts = times.get(row["experiment"])
        row["step_time"] = statistics.median(ts) if ts else math.nan  # a row the benchmark did not time: "–"
        row["step_time_ci"] = math.nan
        row["step_ratio"] = row["step_time"] / base
        row["step_spread"] = max(ts) / min(ts) if ts else math.nan
        row["step_source"] = "alone"


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


def table3(runs: pd.DataFrame, baseline: str = "baseline", step_times: dict | None = None) -> pd.DataFrame:
    """Per experiment: mean and 95% half-width of every metric over seeds, the paper's numbers,
    the change from the baseline (ours with its interval, the paper's) and whether they agree.

    ``step_times`` (:func:`load_step_times`): the step column from ``benchmarks/row_step_times.py``'s runs alone
    (``step_source`` "alone", with ``step_ratio`` to its baseline) instead of the runs' own times ("runs")."""
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
        row["step_source"] = "runs"
        out.append(row)
    if step_times is not None:
        _use_step_times(out, step_times, baseline)
    table = pd.DataFrame(out)
    table.attrs["step_times"] = None if step_times is None else {k: v for k, v in step_times.items() if k != "times_s"}
    table.attrs["baseline"] = baseline
    return table


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
        }
        if r.get("step_source") == "alone":  # measured with the row alone: the ratio is what compares with the paper
            paper_base = PAPER_TABLE3[table.attrs.get("baseline", "baseline")]["step_time"]
            cells["step ms alone (× baseline)"] = ("–" if _missing(r["step_time"]) else
                                                   f"{r['step_time'] * 1e3:.0f} ({r['step_ratio']:.2f})")
            cells["paper step s (× baseline)"] = ("–" if _missing(r["paper_step_time"]) else
                                                  f"{r['paper_step_time']:.2f} ({r['paper_step_time'] / paper_base:.2f})")
        else:
            cells["step (ms)"] = _pm(r["step_time"] * 1e3, r["step_time_ci"] * 1e3, 0)
            cells["paper step (s)"] = _paper(r["paper_step_time"], 2)
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
    return "\n".join(lines) + "\n" + step_note(table)


def step_note(table: pd.DataFrame) -> str:
    """What the step column measured, under the table: the benchmark's runs alone, or the runs' own times."""
    if "step_source" in table and (table["step_source"] == "alone").any():
        bench = table.attrs.get("step_times") or {}
        spread = max((v for v in table["step_spread"] if not _missing(v)), default=math.nan)
        untimed = [r for r, t in zip(table["experiment"], table["step_time"]) if _missing(t)]
        code = ((bench.get("machine") or {}).get("code") or {}).get("commit") or "?"
        overrides = bench.get("overrides")
        return (f"\nStep: median of {bench.get('repeats', '?')} runs of {bench.get('steps', '?')} steps with each row "
                f"alone, {bench.get('threads', '?')} thread(s) (benchmarks/row_step_times.py, {bench.get('date', '?')}, "
                f"commit {code[:7]}, {(bench.get('machine') or {}).get('cpu', '?')}"
                + (f", overrides {' '.join(overrides)}" if overrides else "") + ")"
                + ("" if _missing(spread) else f"; the slowest run of a row is at most {spread:.2f}× its fastest")
                + (f"; not timed alone: {', '.join(untimed)}" if untimed else "")
                + ". The runs' own times (taken side by side) are in runs.csv.\n")
    if "step_source" in table and (table["step_source"] == "runs").any():
        return ("\nStep: the runs' own median step times, mean ± 95% CI over seeds. The study trains runs side by "
                "side, so these carry the other runs' load: for a step column to compare with the paper's, run "
                "benchmarks/row_step_times.py --out <sweep folder>/step_times.md and render again.\n")
    return ""


def to_html(table: pd.DataFrame) -> str:
    import html

    note = step_note(table).strip()
    return pd.DataFrame(render_rows(table)).to_html(index=False, escape=True) + (f"\n<p>{html.escape(note)}</p>"
                                                                                   if note else "")
