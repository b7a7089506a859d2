"""What the frozen encoder's feature cache (``model.vision.cache_mib``) saves on a run of the embedded study.

Each repeat trains one row twice at the same time, one thread each (as the sweep runs its jobs), without and
with the cache, so that both runs see the same machine: the median step, the training's wall time (the
baseline's includes its accuracy curve, evaluated every 50 steps), the final evaluation's wall time, and the
share of frames the cache served (from an earlier step or prompt, or repeated within one batch). The runs
agree up to float rounding (a frame's tokens computed in another batch), which 400 steps grow to a few tenths
of a point; evaluations of one checkpoint must give the same scores (checked).

    .venv/bin/python benchmarks/vision_cache.py                     # baseline row, 400 steps, 3 repeats
    .venv/bin/python benchmarks/vision_cache.py --row xattn_every2 --repeats 5

``--eval <run folder>`` measures ``flamingo-eval`` of a trained run instead (both side by side again, with
``vision_cache_mib`` off and on): many-shot prompts show the same support images again and again.

    .venv/bin/python benchmarks/vision_cache.py --eval multirun/table3-embedded/baseline/seed0 --shots 16

Needs the embedded world (``make data``); about 4 minutes a training repeat on 2 cores, half a minute an
evaluation repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start(command: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.Popen([*command, f"hydra.run.dir={out}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out.with_suffix(".log"), "w"))


def train_command(args, cache_mib: int) -> list[str]:
    return [str(BIN / "flamingo-train"), f"experiment={args.row}", f"data.root={args.data_root}", "seed=0",
            f"trainer.max_steps={args.steps}", "logger=none", "trainer.enable_progress_bar=false",
            f"model.vision.cache_mib={cache_mib}"]


def eval_command(args, cache_mib: int) -> list[str]:
    return [str(BIN / "flamingo-eval"), f"checkpoint={args.eval}", f"eval.tasks=[{args.tasks}]",
            f"eval.shots=[{args.shots}]", f"eval.max_items={args.items}", "progress=false",
            f"vision_cache_mib={cache_mib}"]


def side_by_side(args, command, summarize) -> dict[str, list[dict]]:
    """``args.repeats`` times: the command without and with the cache at the same time; their summaries."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="vision_cache_") as tmp:
        for r in range(args.repeats):
            procs = {name: (start(command(args, mib), Path(tmp) / f"{name}{r}"), Path(tmp) / f"{name}{r}")
                     for name, mib in (("off", 0), ("on", args.cache_mib))}
            for name, (proc, out) in procs.items():
                if proc.wait() != 0:
                    sys.exit(f"{name} {r} failed; its log:\n" + out.with_suffix(".log").read_text()[-3000:])
                runs[name].append(summarize(json.loads((out / "results.json").read_text())))
            print(f"repeat {r + 1}/{args.repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    return runs


def median_of(runs: dict[str, list[dict]]):
    return lambda name, key: statistics.median(x[key] for x in runs[name])


def eval_summary(results: dict) -> dict:
    cache = results.get("vision_cache") or {}
    per_task = {t: by_k[next(iter(by_k))] for t, by_k in results["eval"]["scores"].items()}
    return {"total_s": results["wall_time_s"], **{f"{t}_s": r["seconds"] for t, r in per_task.items()},
            "scores": {t: r["score"] for t, r in per_task.items()}, "saved_share": cache.get("saved_share")}


def bench_eval(args) -> None:
    runs = side_by_side(args, eval_command, eval_summary)
    tasks = args.tasks.split(",")
    if runs["on"][0]["scores"] != runs["off"][0]["scores"]:
        sys.exit(f"the cache changed the scores: {runs['off'][0]['scores']} without, {runs['on'][0]['scores']} with")
    med = median_of(runs)
    print(f"\nflamingo-eval {args.eval}, {args.shots} shots, {args.items} items a task, median of {args.repeats} "
          f"repeats (each: both side by side, one thread each); the scores are the same with and without\n")
    print("| feature cache | " + " | ".join(f"{t} (s)" for t in tasks) + " | evaluation (s) | vs no cache | frames served |")
    print("|---" * (len(tasks) + 4) + "|")
    for name in ("off", "on"):
        served = f"{100 * med(name, 'saved_share'):.0f}%" if name == "on" else ""
        print(f"| {name} | " + " | ".join(f"{med(name, f'{t}_s'):.1f}" for t in tasks) +
              f" | {med(name, 'total_s'):.1f} | {med(name, 'total_s') / med('off', 'total_s'):.2f}× | {served} |")


def summary(results: dict) -> dict:
    cache = (results.get("vision_cache") or {}).get("with_evaluation") or {}
    return {"step_ms": 1000 * results["step_time_s"]["median"], "train_s": results["wall_time_s"],
            "eval_s": results["eval"]["wall_time_s"], "total_s": results["wall_time_s"] + results["eval"]["wall_time_s"],
            "overall": results["eval"]["overall_score"], "final_loss": results["loss"]["final"],
            "saved_share": cache.get("saved_share"), "cache_mib": cache.get("mib")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="baseline")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-mib", type=int, default=1024)
    ap.add_argument("--data-root", default="data/embedded")
    ap.add_argument("--eval", help="a trained run folder: measure flamingo-eval of it instead of training")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--tasks", default="vqav2,msvdqa")
    ap.add_argument("--items", type=int, default=128)
    args = ap.parse_args()
    if args.eval:
        bench_eval(args)
        return
    runs = side_by_side(args, train_command, summary)
    med = median_of(runs)
    print(f"\n{args.row}, {args.steps} steps, median of {args.repeats} repeats (each: both runs side by side, one "
          f"thread each)\n")
    print("| feature cache | step (ms) | training (s) | final evaluation (s) | run (s) | vs no cache | frames served | "
          "cache (MiB) | Overall | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("off", "on"):
        served = f"{100 * med(name, 'saved_share'):.0f}%" if name == "on" else ""
        held = f"{med(name, 'cache_mib'):.0f}" if name == "on" else ""
        print(f"| {name} | {med(name, 'step_ms'):.0f} | {med(name, 'train_s'):.1f} | {med(name, 'eval_s'):.1f} | "
              f"{med(name, 'total_s'):.1f} | {med(name, 'total_s') / med('off', 'total_s'):.2f}× | {served} | "
              f"{held} | {med(name, 'overall'):.2f} | {med(name, 'final_loss'):.4f} |")


if __name__ == "__main__":
    main()
