"""Where does a trained Flamingo lose a clip's direction? Probes behind the README's Video direction section.

For each trained run folder (its last checkpoint), on fresh clips of its world that each show a move:

- ``latents`` / ``best_latent`` / ``mean_latent``: a linear probe names the direction from the resampler's
  output for the clip: all its latents side by side, the single latent that carries it best, their mean.
- ``attn_1_head`` / ``attn_heads``: what one text token's cross-attention and dense layer could read: learned
  queries (1, or the model's cross-attention heads) over the latents with shared keys and values, then a small
  MLP (an upper bound on that reading's capacity, not what the trained model does).
  The same probes on an untrained resampler of the same config (``untrained_*``) show what training added.
- ``caption`` / ``qa``: the model itself ranks " left", " right", " up", " down" after
  ``<image>the <colour> <shape> moves`` and after the 0-shot question ``<image>Question: which way does the
  <colour> <shape> move? Answer:`` (the share of clips it ranks the true direction first; chance 0.25),
  with ``*_answers`` its answers' counts. ``caption_reversed``: the caption on the clip played backwards,
  scored against the opposite direction (a model that reads frame order keeps its score).

So a reader can tell a resampler that does not carry the direction from a language model that does not read
it (the text-description control cannot: the scene's words name no motion).

    .venv/bin/python benchmarks/direction_probe.py multirun/table3-embedded/baseline/seed0 multirun/table3-embedded/baseline/seed1

Probes fit on 2,000 clips and score 400 others; the ranking uses 120 clips. About a minute a run on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flamingo_lab.data.shards import image_to_tensor  # noqa: E402
from flamingo_lab.data.world import MOVES, VQA_FORMAT, WorldConfig, render_clip, sample_clip  # noqa: E402
from flamingo_lab.eval.harness import make_batch, tokenize_prompt  # noqa: E402
from flamingo_lab.eval.run import load_model  # noqa: E402
from flamingo_lab.models.generation import continuation_logprobs  # noqa: E402
from flamingo_lab.models.resampler import build_resampler  # noqa: E402

DIRECTIONS = list(MOVES)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def clips(cfg: WorldConfig, n: int, seed: int):
    rng = random.Random(seed)
    return [sample_clip(rng, cfg, event="moves") for _ in range(n)]


def clip_tensor(clip, cfg: WorldConfig, image_size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(f, image_size) for f in render_clip(clip, cfg)])  # (F, C, H, W)


def latents(vision, resampler, xs: torch.Tensor) -> torch.Tensor:
    """``(n, F, C, H, W)`` clips -> ``(n, n_latents, D)`` resampler outputs."""
    with torch.no_grad():
        return torch.cat([resampler(vision(xs[i:i + 128, None]))[:, 0] for i in range(0, len(xs), 128)])


def _fit_and_score(head: nn.Module, tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor,
                   steps: int) -> float:
    """Train ``head`` on (tr, ytr) with Adam, full batch; its held-out accuracy on (te, yte)."""
    opt = torch.optim.Adam(head.parameters(), 3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(head(tr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return round(float((head(te).argmax(-1) == yte).float().mean()), 3)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          steps: int = 400) -> float:
    """Held-out accuracy of a linear probe (features standardised on the training clips)."""
    torch.manual_seed(0)  # the probe's start: the same numbers on every call
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    lin = nn.Linear(train_x.shape[-1], len(DIRECTIONS))
    return _fit_and_score(lin, (train_x - mu) / sd, train_y, (test_x - mu) / sd, test_y, steps)


def latent_probes(tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor) -> dict:
    per = [probe(tr[:, j], ytr, te[:, j], yte) for j in range(tr.shape[1])]
    return {"latents": probe(tr.flatten(1), ytr, te.flatten(1), yte), "best_latent": max(per),
            "mean_latent": probe(tr.mean(1), ytr, te.mean(1), yte)}


class _AttentionReader(nn.Module):
    """What one text token's cross-attention and dense layer can read from the latents: ``heads`` learned
    queries, each attending over the latents with keys and values shared by all of them (as a Flamingo's
    cross-attention reads them), the heads' outputs side by side, then a small MLP to the four directions."""

    def __init__(self, dim: int, heads: int, dim_head: int = 32, hidden: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.q = nn.Parameter(torch.randn(heads, dim_head) * 0.1)
        self.kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.mlp = nn.Sequential(nn.Linear(heads * dim_head, hidden), nn.GELU(), nn.Linear(hidden, len(DIRECTIONS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, L, D) -> (n, 4)
        k, v = self.kv(x).view(x.shape[0], x.shape[1], 2, self.heads, self.dim_head).unbind(2)
        w = torch.einsum("hd,nlhd->nhl", self.q, k).div(self.dim_head ** 0.5).softmax(-1)
        return self.mlp(torch.einsum("nhl,nlhd->nhd", w, v).flatten(1))


def attention_probe(tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor, heads: int,
                    steps: int = 800, seed: int = 0) -> float:
    """Held-out accuracy of an :class:`_AttentionReader` with ``heads`` heads (features standardised)."""
    torch.manual_seed(seed)
    mu, sd = tr.mean((0, 1)), tr.std((0, 1)) + 1e-5
    reader = _AttentionReader(tr.shape[-1], heads)
    return _fit_and_score(reader, (tr - mu) / sd, ytr, (te - mu) / sd, yte, steps)


def rank(model, cfg: WorldConfig, test_clips, stem, image_size: int, reverse: bool = False) -> tuple[float, dict]:
    """Share of clips whose true direction the model ranks first after ``stem(object)``, and its answers."""
    tok = model.tokenizer
    conts = [list(tok(" " + d, add_special_tokens=False)["input_ids"]) for d in DIRECTIONS]
    right, answers = 0, collections.Counter()
    for clip in test_clips:
        frames = render_clip(clip, cfg)[::-1] if reverse else render_clip(clip, cfg)
        ids = tokenize_prompt(tok, "<image>" + stem(clip.scene.objects[clip.actor]))
        rows = [(ids + c, [frames]) for c in conts]
        masks = [[0] * len(ids) + [1] * len(c) for c in conts]
        b = make_batch(rows, batch_size=len(rows), length_buckets=[len(ids) + max(map(len, conts))],
                       image_buckets=[1], frames=len(frames), image_size=image_size, pad_id=tok.pad_token_id,
                       extra_masks=masks)
        with torch.no_grad():
            lp = continuation_logprobs(model, b["input_ids"], b["attention_mask"], b["continuation_mask"],
                                       images=b["images"])
        answer = DIRECTIONS[int(lp[:len(DIRECTIONS)].argmax())]
        answers[answer] += 1
        right += answer == (OPPOSITE[clip.detail] if reverse else clip.detail)
    return round(right / len(test_clips), 3), dict(answers)


def run_probe(run: str, world: str | None, n_rank: int) -> dict:
    model, run_cfg = load_model(run)
    root = Path(world or run_cfg["data"]["root"])
    cfg = WorldConfig(**json.loads((root / "world.json").read_text())["config"])
    size = int(model.cfg.vision.image_size)
    tr_clips, te_clips = clips(cfg, 2000, 1), clips(cfg, 400, 2)
    xtr = torch.stack([clip_tensor(c, cfg, size) for c in tr_clips])
    xte = torch.stack([clip_tensor(c, cfg, size) for c in te_clips])
    ytr = torch.tensor([DIRECTIONS.index(c.detail) for c in tr_clips])
    yte = torch.tensor([DIRECTIONS.index(c.detail) for c in te_clips])
    ltr, lte = latents(model.vision, model.resampler, xtr), latents(model.vision, model.resampler, xte)
    out = latent_probes(ltr, ytr, lte, yte)
    heads = int(model.cfg.xattn.heads)
    out["attn_1_head"] = attention_probe(ltr, ytr, lte, yte, heads=1)
    out[f"attn_{heads}_heads"] = out["attn_heads"] = attention_probe(ltr, ytr, lte, yte, heads=heads)
    torch.manual_seed(0)
    fresh = build_resampler(model.resampler.cfg, model.vision.dim, model.vision.num_tokens).eval()
    untrained = latent_probes(latents(model.vision, fresh, xtr), ytr, latents(model.vision, fresh, xte), yte)
    out.update({f"untrained_{k}": v for k, v in untrained.items()})
    rank_clips = clips(cfg, n_rank, 5)
    def caption(o):
        return f"the {o.colour} {o.shape} moves"
    def question(o):
        return VQA_FORMAT.format(question=f"which way does the {o.colour} {o.shape} move?", answer="").rstrip()
    out["caption"], out["caption_answers"] = rank(model, cfg, rank_clips, caption, size)
    out["qa"], out["qa_answers"] = rank(model, cfg, rank_clips, question, size)
    out["caption_reversed"], _ = rank(model, cfg, rank_clips, caption, size, reverse=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="trained run folders (or .ckpt files)")
    ap.add_argument("--world", help="world folder (default: the run's data.root)")
    ap.add_argument("--rank-clips", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cols = ["latents", "best_latent", "mean_latent", "attn_1_head", "attn_heads", "untrained_latents", "untrained_best_latent",
            "untrained_mean_latent", "caption", "qa", "caption_reversed"]
    print("| run | " + " | ".join(cols) + " | answers (caption; qa) |")
    print("|---" * (len(cols) + 2) + "|")
    for run in args.runs:
        r = run_probe(run, args.world, args.rank_clips)
        print(f"| {run} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + f" | {r['caption_answers']}; {r['qa_answers']} |",
              flush=True)


if __name__ == "__main__":
    main()
