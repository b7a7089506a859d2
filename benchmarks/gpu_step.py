"""What a Table 3 row costs on a GPU at the paper's scale: the Flamingo-3B preset's training step.

Builds each row's model at ``scale=flamingo-3b`` with real (random) weights on the GPU -- NFNet-F6 at
320 px, the 6-layer Perceiver, 24 GATED XATTN-DENSE blocks in a 24-layer, 2048-wide LM -- and times
forward + backward under bf16 autocast (fp32 parameters, as the paper) for one micro-batch of each
training source, then the AdamW step over the trainable parameters. Inputs are synthetic (random
token ids with ``<image>`` tokens where the paper's layouts put them, random pixels): the cost of a
step does not depend on their values. The paper's ablation step (M3W 256, ALIGN 512, LTIP 512, VTP
64 sequences) is then ``sum(batch / micro-batch x time per micro-batch) + optimiser``, reported as an
estimate beside the measured micro-batch times; ratios are against the first row, measured in the
same invocation. Medians of ``--repeats`` timed repetitions after ``--warmup``.

    python benchmarks/gpu_step.py                                  # baseline, CLIP, NFNet-F0, every 4th
    python benchmarks/gpu_step.py --rows baseline lm_finetuned --micro m3w=4 ltip=16

Needs a CUDA GPU with ~60 GB (one H100 80 GB holds the 3B model, its AdamW state and these micro-batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

#: the paper's ablation batch sizes, and the sequence layout of each source (tokens, images, frames)
PAPER_BATCH = {"m3w": 256, "ltip": 512, "align": 512, "vtp": 64}
LAYOUT = {"m3w": (256, 5, 1), "ltip": (32, 1, 1), "align": (32, 1, 1), "vtp": (32, 1, 8)}


def synthetic_batch(model, source: str, micro: int, image_size: int, device) -> dict[str, torch.Tensor]:
    length, n_images, frames = LAYOUT[source]
    vocab = model.lm.get_input_embeddings().num_embeddings
    ids = torch.randint(10, min(vocab, 32000) - 10, (micro, length), device=device)
    positions = torch.linspace(0, length - 8, n_images).long()  # images spread over the window
    ids[:, positions] = model.media_token_id
    ids[:, -1] = model.eoc_token_id
    images = torch.randn(micro, n_images, frames, 3, image_size, image_size, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "images": images}


def time_row(row: str, micro: dict[str, int], repeats: int, warmup: int) -> dict:
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    cfg = compose([f"experiment={row}", "scale=flamingo-3b", "model.init_device=cuda", "logger=none"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_flamingo(cfg.model)  # built on the GPU (model.init_device=cuda): random weights
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    size = int(cfg.model.vision.image_size)
    batches = {s: synthetic_batch(model, s, m, size, device) for s, m in micro.items()}

    def run_source(source):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batches[source]).loss
        loss.backward()

    # What a feature cache would save: the frozen encoder's output for the same images, computed once.
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        features = {s: model.vision(b["images"]) for s, b in batches.items()}
    encoder_forward = model.vision.forward

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    per_source: dict[str, list[float]] = {s: [] for s in micro}
    opt_times: list[float] = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        for s in micro:
            t = timed(lambda: run_source(s))
            if i >= warmup:
                per_source[s].append(t)
        t = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        if i >= warmup:
            opt_times.append(t)
    med = {s: statistics.median(v) for s, v in per_source.items()}
    opt_s = statistics.median(opt_times)
    step = sum(PAPER_BATCH[s] / micro[s] * med[s] for s in micro) + opt_s
    peak = torch.cuda.max_memory_allocated() / 2**30
    cached: dict[str, list[float]] = {s: [] for s in micro}
    for i in range(warmup + repeats):
        for s in micro:
            model.vision.forward = lambda images, _s=s: features[_s]  # the cache's lookup
            t = timed(lambda: run_source(s))
            if i >= warmup:
                cached[s].append(t)
        opt.zero_grad(set_to_none=True)
    model.vision.forward = encoder_forward
    med_cached = {s: statistics.median(v) for s, v in cached.items()}
    step_cached = sum(PAPER_BATCH[s] / micro[s] * med_cached[s] for s in micro) + opt_s
    out = {
        "row": row, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "trainable_b": sum(p.numel() for p in params) / 1e9, "micro_s": med, "opt_s": opt_s,
        "step_s": step, "step_cached_s": step_cached, "peak_gb": peak,
    }
    del model, opt, batches
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["baseline", "vision_clip", "vision_nfnet_f0", "xattn_every4"])
    ap.add_argument("--micro", nargs="+", default=["m3w=4", "ltip=16", "align=16", "vtp=4"],
                    help="micro-batch per source (SOURCE=N)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    micro = {k: int(v) for k, v in (m.split("=") for m in args.micro)}
    results = []
    for row in args.rows:
        r = time_row(row, micro, args.repeats, args.warmup)
        results.append(r)
        print(f"  {row}: {r}", file=sys.stderr, flush=True)
    base = results[0]["step_s"]
    name = torch.cuda.get_device_name()
    cols = " | ".join(f"{s} ×{m} (ms)" for s, m in micro.items())
    print(f"{name}, torch {torch.__version__}, bf16 autocast, fp32 parameters, cudnn.benchmark "
          f"{args.cudnn_benchmark}; medians of {args.repeats}\n")
    print(f"| row | params (B) | trainable (B) | {cols} | AdamW (ms) | paper-batch step, est. (s) | vs {results[0]['row']} "
          "| same, vision features cached (s) | peak GiB |")
    print("|---|---|---|" + "---|" * len(micro) + "---|---|---|---|---|")
    for r in results:
        ms = " | ".join(f"{1000 * r['micro_s'][s]:.0f}" for s in micro)
        print(f"| {r['row']} | {r['params_b']:.2f} | {r['trainable_b']:.2f} | {ms} | {1000 * r['opt_s']:.0f} | "
              f"{r['step_s']:.2f} | {r['step_s'] / base:.2f}x | {r['step_cached_s']:.2f} | {r['peak_gb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
