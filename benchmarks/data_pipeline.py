"""Samples per second of each source's pipeline on one core, beside the training step's consumption.

    .venv/bin/python benchmarks/data_pipeline.py                     # data/embedded (written if missing)
    .venv/bin/python benchmarks/data_pipeline.py --root /tmp/w --samples 400 --repeats 5 --steps 8

Each source's pipeline (tar -> decode -> tokenise -> fixed-shape tensors, at the data config's
per-source shape) runs in this process with torch limited to one thread; the figure is the median
of ``--repeats`` runs. The consumption rate is what the embedded training step eats: per source, its
batch size / the measured step time (median of ``--steps`` accumulate steps after warm-up). A
pipeline needs about (consumption / pipeline rate) DataLoader workers to keep up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flamingo_lab.config import compose
from flamingo_lab.data.mixture import source_specs
from flamingo_lab.data.shards import load_world, make_source_stream
from flamingo_lab.models import load_tokenizer


def pipeline_rate(urls, tokenizer, source, spec, image_size, n, repeats) -> float:
    rates = []
    shape = {k: spec[k] for k in ("seq_len", "max_images", "frames", "frame_stride", "max_doc_images")}
    for r in range(repeats):
        stream = make_source_stream(urls, tokenizer, source=source, train=True, seed=r, image_size=image_size,
                                    shuffle_buffer=100, **shape)
        it = iter(stream)
        next(it)  # open the first shard outside the timing
        t0 = time.perf_counter()
        for _ in islice(it, n):
            pass
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def step_time(cfg, steps: int) -> float:
    from flamingo_lab.training.datamodule import FlamingoDataModule
    from flamingo_lab.training.module import FlamingoModule

    container = OmegaConf.to_container(cfg, resolve=True)
    module, dm = FlamingoModule(container), FlamingoDataModule(container)
    dm.setup()
    loaders = dm.train_loaders()
    its = {s: iter(dl) for s, dl in loaders.items()}
    batches = [{s: next(it) for s, it in its.items()} for _ in range(2)]  # data loading is not timed here
    for b in batches:
        for v in b.values():
            v.pop("skipped", None)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = module.training_step(batches[i % 2], i)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/embedded")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (e.g. data=laion)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (Path(args.root) / "world.json").is_file():
        from flamingo_lab.data.world import write_world
        from flamingo_lab.make_data import compose_world

        print(f"writing the embedded world to {args.root} ...")
        write_world(compose_world("embedded"), args.root, progress=False)
    cfg = compose([f"data.root={args.root}", "logger=none", *args.overrides])
    world = load_world(args.root)
    tokenizer = load_tokenizer(OmegaConf.to_container(cfg.model.lm, resolve=True))
    specs = source_specs(OmegaConf.to_container(cfg.data, resolve=True))
    image_size = int(cfg.model.vision.image_size)
    all_sources = dict(specs)
    for extra in ("laion",):  # the LAION row's source, at the pairs' shape, for the table
        if extra not in all_sources and extra in world["shards"]["train"]:
            all_sources[extra] = {**specs.get("ltip", next(iter(specs.values()))), "weight": 0.0,
                                  "batch_size": 4 * int(cfg.data.batch_size)}
    step = step_time(cfg, args.steps)
    print(f"\nembedded training step (accumulate over {', '.join(specs)}): {step * 1e3:.0f} ms median of {args.steps}, "
          f"torch threads 1\n")
    print(f"| source | shape (seq_len, images x frames) | pipeline samples/s (1 core) | step consumes samples/s | workers needed |")
    print("|---|---|---|---|---|")
    for source, spec in all_sources.items():
        rate = pipeline_rate(world["shards"]["train"][source], tokenizer, source, spec, image_size, args.samples,
                             args.repeats)
        eats = spec["batch_size"] / step if source in specs else float("nan")
        need = f"{eats / rate:.2f}" if source in specs else "(not in this mix)"
        print(f"| {source} | {spec['seq_len']}, {spec['max_images']} x {spec['frames']} | {rate:.0f} | "
              f"{eats:.0f} | {need} |")


if __name__ == "__main__":
    main()
