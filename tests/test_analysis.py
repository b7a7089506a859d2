"""Sweep analysis: tidy frame, Table 3 with intervals over seeds, the paper's numbers, plots."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from flamingo_lab.eval.metrics import overall_score

from flamingo_lab.analysis import (
    PAPER_REFERENCES, PAPER_TABLE3, TASKS, diff_ci, load_runs, load_wandb, mean_ci,
    plot_loss_curves, plot_overall, table3, to_html, to_markdown,
)


def test_paper_overall_is_the_mean_of_scores_over_references():
    """The paper's Overall column follows from its task columns to within its rounding (≤ 0.25 points;
    'w/o Video-Text' is the worst: 67.5 computed vs 67.3 printed)."""
    for key, row in PAPER_TABLE3.items():
        if row["coco"] is None:
            continue
        computed = overall_score({t: row[t] for t in TASKS}, PAPER_REFERENCES)
        assert abs(computed - row["overall"]) <= 0.25, (key, computed, row["overall"])


def test_mean_ci_uses_student_t():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)  # t_{0.975}(2) * s / sqrt(n), s = 1
    assert math.isnan(mean_ci([5.0])[1])


def test_diff_ci_welch():
    delta, half = diff_ci([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert delta == pytest.approx(9.0)
    # equal variances and sizes: se = sqrt(2/3), Welch df = 4 -> t = 2.776
    assert half == pytest.approx(2.776 * math.sqrt(2 / 3), rel=1e-4)


def _write_run(folder, experiment, seed, overall, status="complete", curve=None, overall_tasks=TASKS):
    folder.mkdir(parents=True)
    scores = {t: overall + i for i, t in enumerate(TASKS)}
    results = {
        "experiment": experiment, "status": status, "config": {"seed": seed},
        "params": {"total": 1_500_000}, "step_time_s": {"median": 0.08},
        "loss": {"final": 2.0, "curve": curve or {"step": [10, 20], "loss": [4.0, 3.0]}},
        "eval": {"scores": {t: {"4": {"metric": "m", "score": v}} for t, v in scores.items()},
                 "overall": {"4": overall}, "overall_score": overall, "overall_shots": 4,
                 "overall_tasks": list(TASKS), "overall_tasks_used": list(overall_tasks)}
        if status == "complete" else {},
    }
    if status != "complete":
        results["error"] = "RuntimeError: boom"
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    for s, v in enumerate([70.0, 71.0, 69.0]):
        _write_run(tmp_path / f"b{s}", "baseline", s, v)
    for s, v in enumerate([50.0, 52.0, 51.0]):
        _write_run(tmp_path / f"m{s}", "no_m3w", s, v)
    for s, v in enumerate([70.5, 69.5]):
        _write_run(tmp_path / f"t{s}", "no_tanh", s, v)
    _write_run(tmp_path / "t9", "no_tanh", 9, 0.0, status="failed")
    return tmp_path


def test_table3_means_intervals_and_direction(sweep):
    runs = load_runs(sweep)
    assert len(runs) == 9
    table = table3(runs).set_index("experiment")
    assert list(table.index) == ["baseline", "no_m3w", "no_tanh"]  # the paper's row order
    assert table.loc["baseline", "overall"] == pytest.approx(70.0)
    assert table.loc["no_m3w", "delta"] == pytest.approx(-19.0)
    assert table.loc["no_m3w", "agrees"] is True or table.loc["no_m3w", "agrees"] == True  # noqa: E712
    assert bool(table.loc["no_m3w", "significant"])  # a 19-point drop, intervals of ~2.5
    assert not bool(table.loc["no_tanh", "significant"])  # 0 ± a few: the interval holds zero
    assert table.loc["no_tanh", "seeds"] == 2 and table.loc["no_tanh", "failed"] == 1
    assert table.loc["no_m3w", "paper_overall"] == 53.4


def test_markdown_and_html_show_ours_beside_the_paper(sweep):
    table = table3(load_runs(sweep))
    md = to_markdown(table)
    assert "w/o M3W" in md and "(53.4)" in md and "51.0 ± " in md
    assert "(+1 failed)" in md
    html = to_html(table)
    assert html.startswith("<table") and "w/o M3W" in html


def test_the_step_column_comes_from_the_rows_timed_alone_when_the_sweep_folder_holds_them(sweep):
    """The study's runs share the machine, so the step time each records carries the others' load (the embedded
    baseline's seeds: 627 ± 222 ms side by side, 390 alone). benchmarks/row_step_times.py --out
    <sweep>/step_times.md leaves each row's times alone beside it, and the table takes its step column from
    them: the median, its ratio to the benchmark's own baseline and the paper's ratio; a row it did not time
    shows "–", not the runs' loaded time. Without the file the note under the table says what the column is."""
    from flamingo_lab.analysis import load_step_times
    from flamingo_lab.sweep import render

    runs = load_runs(sweep)
    plain = to_markdown(table3(runs, step_times=load_step_times(sweep)))
    assert "| step (ms) |" in plain and "| 80 ± 0 |" in plain  # the runs' own times (every seed 0.08 s here)
    assert "carry the other runs' load" in plain

    bench = {"date": "2026-11-24", "steps": 40, "repeats": 3, "threads": 1,
             "machine": {"cpu": "AMD EPYC", "code": {"commit": "abcdef0123"}},
             "times_s": {"baseline": [0.40, 0.39, 0.41], "no_m3w": [0.22, 0.23, 0.25]}}
    (sweep / "step_times.json").write_text(json.dumps(bench))
    table = table3(runs, step_times=load_step_times(sweep)).set_index("experiment")
    assert table.loc["no_m3w", "step_time"] == pytest.approx(0.23)
    assert table.loc["no_m3w", "step_ratio"] == pytest.approx(0.23 / 0.40)
    assert table.loc["no_m3w", "step_time_runs"] == pytest.approx(0.08)  # the runs' own, kept
    md = to_markdown(table.reset_index())
    cells = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 230 (0.57) | 1.02 (0.59) |" in cells["w/o M3W"]  # paper: 1.02 s against 1.74 s
    assert "| 400 (1.00) | 1.74 (1.00) |" in cells["baseline"]
    assert "| – | 1.74 (1.00) |" in cells["no"]  # no tanh gating: not timed alone
    assert "3 runs of 40 steps with each row alone" in md and "commit abcdef0" in md and "1.14×" in md
    assert "not timed alone: no_tanh" in md
    assert "step ms alone" in to_html(table.reset_index()) and "each row alone" in to_html(table.reset_index())

    written = render(sweep)  # the sweep's render (and the notebook) read the file from the folder
    assert "| 230 (0.57) |" in written["markdown"].read_text()

    (sweep / "step_times.json").write_text(json.dumps({"times_s": {"no_m3w": [0.2]}}))
    with pytest.raises(ValueError, match="no baseline among its rows"):
        load_step_times(sweep)
    (sweep / "step_times.json").write_text(json.dumps({"baseline": 0.4}))
    with pytest.raises(ValueError, match="not written by benchmarks/row_step_times.py"):
        load_step_times(sweep)


def test_plots_are_written(sweep, tmp_path):
    runs = load_runs(sweep)
    overall = plot_overall(table3(runs), tmp_path / "overall.png")
    curves = plot_loss_curves(runs, tmp_path / "loss.png")
    for p in (overall, curves):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_load_wandb_reads_the_results_summary(sweep):
    class Run:
        def __init__(self, path):
            self.summary = {"results": json.loads(path.read_text())}
            self.url = str(path)

    class Api:
        def runs(self, project, filters=None):
            assert project == "flamingo-lab" and filters == {"group": "g"}
            return [Run(p) for p in sorted(sweep.rglob("results.json"))]

    runs = load_wandb("flamingo-lab", group="g", api=Api())
    assert len(runs) == 9 and set(runs["experiment"]) == {"baseline", "no_m3w", "no_tanh"}


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_runs(tmp_path)


def test_one_seed_per_row_renders_without_intervals(tmp_path):
    _write_run(tmp_path / "b", "baseline", 0, 70.0)
    _write_run(tmp_path / "m", "no_m3w", 0, 50.0)
    _write_run(tmp_path / "a", "attend_all_previous", 0, 70.0)
    table = table3(load_runs(tmp_path))
    md = to_markdown(table)
    assert "nan" not in md.lower()
    row = table.set_index("experiment").loc["no_m3w"]
    assert row["agrees"] and math.isnan(row["delta_ci"])  # one seed: a direction, no interval
    same = table.set_index("experiment").loc["attend_all_previous"]
    assert same["agrees"] is None  # no change at all is not "the paper's way"


def _baseline_run(folder, seed, colour, control, curve_scores):
    """A baseline results.json with a per-question-type breakdown, a text control and an eval curve."""
    folder.mkdir(parents=True)
    def entry(score, extra=True):
        e = {"metric": "vqa_accuracy", "n": 40, "score": score,
             "breakdown": {"qtype=colour": {"n": 20, "score": score, **({"chance": 22.0, "majority": 30.0} if extra else {})},
                           "qtype=count": {"n": 20, "score": 90.0, **({"chance": 40.0, "majority": 50.0} if extra else {})}}}
        return e
    results = {
        "experiment": "baseline", "status": "complete", "config": {"seed": seed},
        "eval": {"scores": {"vqav2": {"0": entry(colour - 10), "4": entry(colour)}}, "overall_shots": 4,
                 "controls": {"text": {"vqav2": {"4": entry(control, extra=False)}}}},
        "eval_curve": [{"step": s, "scores": {"vqav2": {"4": {"score": v, "breakdown": {"qtype=colour": {"score": v / 2}}}}}}
                       for s, v in curve_scores],
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_baseline_breakdown_puts_chance_majority_and_the_text_control_beside_the_scores(tmp_path):
    from flamingo_lab.analysis import breakdown_markdown, breakdown_table, curve_frame, load_runs, plot_eval_curve

    _baseline_run(tmp_path / "baseline" / "seed0", 0, colour=60.0, control=90.0, curve_scores=[(0, 10.0), (50, 40.0)])
    _baseline_run(tmp_path / "baseline" / "seed1", 1, colour=70.0, control=80.0, curve_scores=[(0, 20.0), (50, 60.0)])
    runs = load_runs(tmp_path)
    table = breakdown_table(runs)
    colour = table[(table["task"] == "vqav2") & (table["group"] == "qtype=colour")].iloc[0]
    assert colour["4-shot"] == pytest.approx(65.0) and colour["0-shot"] == pytest.approx(55.0)
    assert colour["4-shot ci"] == pytest.approx(12.706 * 5.0)  # t_{0.975}(1) * s / sqrt(2), s = 7.07
    assert colour["text control"] == pytest.approx(85.0) and colour["chance"] == 22.0 and colour["seeds"] == 2
    assert list(table["group"][:1]) == ["all"]  # the whole task first, then its groups
    md = breakdown_markdown(table)
    assert "| vqav2 | qtype=colour | 20 | 2 |" in md and "+43.0" in md  # 65 - 22 points above chance
    curve = curve_frame(runs)
    mean = curve[(curve["group"] == "all")].groupby("step")["score"].mean()
    assert mean.to_dict() == {0: 15.0, 50: 50.0}
    assert set(curve["group"]) == {"all", "qtype=colour"}
    assert plot_eval_curve(runs, tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no complete run of 'no_m3w'"):
        breakdown_table(runs, experiment="no_m3w")


def test_table3_never_counts_a_seed_twice_nor_an_unlabelled_file_and_keeps_rows_that_all_failed(tmp_path):
    import pandas as pd

    from flamingo_lab.analysis.table import load_runs

    _write_run(tmp_path / "b0", "baseline", 0, 60.0)
    _write_run(tmp_path / "b1", "baseline", 1, 62.0)
    _write_run(tmp_path / "m0", "no_m3w", 0, 0.0, status="failed")
    _write_run(tmp_path / "m1", "no_m3w", 1, 0.0, status="failed")
    (tmp_path / "eval").mkdir()  # a flamingo-eval results.json: no status, no experiment
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"eval": {"overall_score": 10.0}}))
    table = table3(load_runs(tmp_path)).set_index("experiment")
    assert table.loc["baseline", "seeds"] == 2 and table.loc["baseline", "overall"] == pytest.approx(61.0)
    assert table.loc["no_m3w", "seeds"] == 0 and table.loc["no_m3w", "failed"] == 2  # the row stays, as failed
    assert "0 (+2 failed)" in to_markdown(table.reset_index())

    _write_run(tmp_path / "copy" / "b1", "baseline", 1, 62.0)  # the same seed twice: a narrower interval
    with pytest.raises(ValueError, match=r"share an \(experiment, seed\): baseline seed 1 .*flamingo-sweep"):
        table3(load_runs(tmp_path))

    one = pd.DataFrame([{"experiment": "baseline", "seed": s, "status": "complete", "overall": v}
                        for s, v in enumerate([50.0, 52.0, None])])
    assert table3(one).set_index("experiment").loc["baseline", "seeds"] == 2  # seeds behind the Overall


def test_table3_refuses_overalls_that_average_different_tasks(tmp_path):
    _write_run(tmp_path / "b0", "baseline", 0, 60.0)
    _write_run(tmp_path / "b1", "baseline", 1, 62.0)
    _write_run(tmp_path / "m0", "no_m3w", 0, 40.0)
    _write_run(tmp_path / "m1", "no_m3w", 1, 44.0, overall_tasks=TASKS[:-1])  # a task without a reference here
    with pytest.raises(ValueError, match=r"average different things .*no_m3w seed 1.*same eval.tasks"):
        table3(load_runs(tmp_path))
    shutil.rmtree(tmp_path / "m1")
    _write_run(tmp_path / "m1", "no_m3w", 1, 44.0)
    assert table3(load_runs(tmp_path)).set_index("experiment").loc["no_m3w", "seeds"] == 2


def test_t_quantile_has_no_step_beyond_the_table():
    from flamingo_lab.analysis.stats import t975

    assert t975(120) == pytest.approx(1.980) and 1.960 < t975(121) < 1.980  # before: 1.960 from 121 on
    assert t975(240) == pytest.approx(1.970) and t975(1e9) == pytest.approx(1.960)
    values = [t975(d) for d in range(1, 400)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # falls with df, no jump


def test_identical_seeds_give_no_interval_rather_than_a_zero_wide_one():
    delta, half = diff_ci([49.99, 49.99], [50.0, 50.0])
    assert delta == pytest.approx(-0.01) and math.isnan(half)  # before: 0.0, so "CI excludes 0: yes"
    delta, half = diff_ci([10.0, 11.0, 12.0, None, float("nan")], [1.0, 2.0, 3.0])  # missing values left out
    assert delta == pytest.approx(9.0) and half == pytest.approx(2.776 * math.sqrt(2 / 3), rel=1e-4)


def test_overall_plot_says_which_rows_have_no_interval(tmp_path):
    from flamingo_lab.analysis.plots import overall_labels

    _write_run(tmp_path / "b0", "baseline", 0, 60.0)
    _write_run(tmp_path / "b1", "baseline", 1, 62.0)
    _write_run(tmp_path / "m0", "no_m3w", 0, 40.0)
    _write_run(tmp_path / "t0", "no_tanh", 0, 0.0, status="failed")
    table = table3(load_runs(tmp_path))
    labels = dict(zip(table["experiment"], overall_labels(table)))
    assert labels["baseline"] == "baseline"
    assert labels["no_m3w"].endswith("(1 seed, no interval)")  # drawn hatched, not as an exact result
    assert labels["no_tanh"].endswith("(no complete seed)")
    assert plot_overall(table, tmp_path / "overall.png").stat().st_size > 0
