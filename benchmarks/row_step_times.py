"""Step time of every Table 3 row, each run alone on an idle machine: the study's step-time column
without the other runs' load.

The study (``make run``) trains two runs side by side, so the step time each run records carries the
other's load, and anything else on the machine (a test run) moves it further. This benchmark trains
each row of ``sweeps/table3.yaml`` for ``--steps`` steps, one run at a time, through the real
``flamingo-train`` (the row's model and batches, data loading, clipping, AdamW; no evaluation, no
logger), reads the median step time its ``results.json`` records (``StepTimer``: a step sees every
source once, round robin's too), and repeats that ``--repeats`` times with the rows in a rotated order,
so that a slow spell of the machine does not fall on one row. It reports, per row, the median over
the repeats, its ratio to the baseline measured in the same invocation, and the paper's step time and
ratio beside it.

    .venv/bin/python benchmarks/row_step_times.py                             # every row, 40 steps, 3 repeats
    .venv/bin/python benchmarks/row_step_times.py --rows baseline no_m3w --steps 20 --repeats 2
    .venv/bin/python benchmarks/row_step_times.py --out multirun/table3-embedded/step_times.md

``--out X.md`` also writes ``X.json`` (every run's time, the settings and the machine); in a sweep folder,
``flamingo-sweep ... render=only`` and the notebook take their step column from it.

Needs the embedded world and the pretrained stages of the rows (a ``make run`` made them; a missing
stage is built first, outside the timed steps). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sweep_rows(path: Path = ROOT / "sweeps" / "table3.yaml") -> list[str]:
    return list(OmegaConf.load(path).rows)


def time_row(row: str, steps: int, threads: int, run_dir: Path, extra: list[str]) -> float:
    """Median step time (s) of ``steps`` training steps of ``row``, from the run's own results.json."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    cmd = [str(BIN / "flamingo-train"), f"experiment={row}", f"trainer.max_steps={steps}",
           "eval.at_end_of_training=false", "eval.curve.every_n_steps=null", "logger=none",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = run_dir / "results.json"
    if proc.returncode != 0 or not results.exists():
        raise RuntimeError(f"{row}: flamingo-train exited {proc.returncode}\n{proc.stderr[-3000:]}")
    data = json.loads(results.read_text())
    if data.get("status") != "complete":
        raise RuntimeError(f"{row}: run {data.get('status')}: {data.get('error')}")
    return float(data["step_time_s"]["median"])


def table(times: dict[str, list[float]], steps: int, repeats: int, threads: int) -> str:
    from flamingo_lab.analysis.paper import PAPER_TABLE3

    base = statistics.median(times["baseline"])
    paper_base = PAPER_TABLE3["baseline"]["step_time"]
    lines = [f"Median step time over {repeats} runs of {steps} steps each, one run at a time, {threads} thread(s); "
             "ratio to the baseline of the same invocation; spread = the slowest run's median over the fastest's.",
             "", "| row | step ms | × baseline | spread | paper step s | paper × baseline |", "|---|---|---|---|---|---|"]
    for row, ts in times.items():
        med = statistics.median(ts)
        paper = PAPER_TABLE3.get(row, {}).get("step_time")
        paper_cells = f"{paper} | {paper / paper_base:.2f}" if paper is not None else "– | –"
        lines.append(f"| {row} | {1000 * med:.0f} | {med / base:.2f} | {max(ts) / min(ts):.2f} | {paper_cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=None, help="rows (default: sweeps/table3.yaml's)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (the first 3 are warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row, rows rotated between repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the study: 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the table to this markdown file, and the times to the .json beside it (a sweep "
                         "folder's step_times.md: its rendered table takes the step column from them)")
    ap.add_argument("overrides", nargs="*", help="flamingo-train overrides given to every run (e.g. seed=1)")
    args = ap.parse_args(argv)
    rows = args.rows or sweep_rows()
    if "baseline" not in rows:
        rows = ["baseline", *rows]  # the ratios need it
    if args.steps < 8:
        ap.error("--steps must be at least 8: the first 3 steps are warm-up")
    times: dict[str, list[float]] = {row: [] for row in rows}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="row_step_times-") as tmp:
        for r in range(args.repeats):
            order = rows[r * len(rows) // args.repeats:] + rows[:r * len(rows) // args.repeats]
            for i, row in enumerate(order):
                t = time_row(row, args.steps, args.threads, Path(tmp) / row / f"r{r}", list(args.overrides))
                times[row].append(t)
                print(f"[{time.perf_counter() - started:6.0f} s] repeat {r + 1}/{args.repeats}, "
                      f"{i + 1}/{len(order)} {row}: {1000 * t:.0f} ms", flush=True)
    text = table(times, args.steps, args.repeats, args.threads)
    print(text)
    if args.out:
        from flamingo_lab.machine import machine

        args.out.write_text(text + "\n")
        record = {"what": "median step time (s) of each run, each row alone (benchmarks/row_step_times.py)",
                  "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats,
                  "threads": args.threads, "overrides": list(args.overrides),
                  "machine": {**machine(), "threads": args.threads}, "times_s": times}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"written: {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
