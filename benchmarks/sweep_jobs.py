"""How a sweep should use a small CPU: 1 run with N threads, or N runs with 1 thread each?

Times the embedded baseline's training step (the real model, the real batches of every training
source, forward + backward + AdamW) in worker processes: ``jobs`` processes at once, each with
``threads`` torch threads, every combination of ``--configs``. Reports the median step time of each
process over ``--repeats`` timed rounds and the throughput (steps per second over all processes) as
a ratio to the first configuration, measured in the same invocation.

    .venv/bin/python benchmarks/sweep_jobs.py                       # 1x2 vs 2x1 on the embedded world
    .venv/bin/python benchmarks/sweep_jobs.py --configs 1x1 1x2 2x1 --steps 12 --repeats 5

Needs the embedded world and its pretrained stages (``make data`` and one ``make run``, or it builds
the stages first). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time


def _worker(threads: int, steps: int, repeats: int, start, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    from flamingo_lab.config import compose
    from flamingo_lab.pretrain.stages import ensure_pretrained
    from flamingo_lab.training.datamodule import FlamingoDataModule
    from flamingo_lab.training.module import FlamingoModule

    cfg = compose(["experiment=baseline", "logger=none"])
    ensure_pretrained(cfg, progress=False)
    c = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    module, dm = FlamingoModule(c), FlamingoDataModule(c)
    dm.setup("fit")
    iters = {s: iter(loader) for s, loader in dm.train_loaders().items()}
    batches = [{s: dm.on_before_batch_transfer(next(it), 0) for s, it in iters.items()} for _ in range(steps)]
    opt = module.configure_optimizers()["optimizer"]
    module.train()

    def step(batch):
        loss = sum(module(b).loss for b in batch.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:  # warm-up: first shapes, allocator
        step(b)
    start.wait()  # every process times the same wall-clock window
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            step(b)
        times.append((time.perf_counter() - t) / len(batches))
    queue.put(statistics.median(times))


def measure(jobs: int, threads: int, steps: int, repeats: int) -> list[float]:
    ctx = mp.get_context("spawn")
    start, queue = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, steps, repeats, start, queue)) for _ in range(jobs)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["1x2", "2x1"], help="JOBSxTHREADS, the first is the baseline")
    ap.add_argument("--steps", type=int, default=8, help="training steps per timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    args = ap.parse_args(argv)
    rows = []
    for spec in args.configs:
        jobs, threads = (int(x) for x in spec.lower().split("x"))
        per_proc = measure(jobs, threads, args.steps, args.repeats)
        step = statistics.median(per_proc)
        rows.append((spec, jobs, threads, step, jobs / step))
        print(f"  {spec}: per-process median step {1000 * step:.0f} ms", file=sys.stderr, flush=True)
    base = rows[0][4]
    print(f"| jobs x threads | step per process (ms, median of {args.repeats}) | steps/s, all processes | vs {rows[0][0]} |")
    print("|---|---|---|---|")
    for spec, _, _, step, rate in rows:
        print(f"| {spec} | {1000 * step:.0f} | {rate:.2f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
