"""Where does a frozen encoder keep an object's position? Probes behind the README's Position section.

The Perceiver Resampler reads a frame's tokens as a set (the paper adds no spatial grid encoding: CNN
features are said to carry position in their channels). This measures, on held-out renders of the world:

- ``token_row`` / ``token_col``: a linear probe names a token's row / column of the grid from its channels;
- ``single_cell``: a linear probe names a single object's cell from the mean-pooled tokens (a set reader);
- ``reader`` / ``reader_spatial``: a small reader that attends over the tokens with the question's colour
  and shape as its query answers "where is the <colour> <shape>?" (multi-object scenes, held-out colour-shape
  pairs and seen ones), without and with a learned embedding per grid position added to the tokens
  (what ``model.resampler.spatial_emb=true`` adds).

    .venv/bin/python benchmarks/position_probe.py                                   # F6 of the embedded study
    .venv/bin/python benchmarks/position_probe.py --vision clip_vit_l14 --checkpoint data/embedded/cache/vision-0fe543982a2c/encoder.safetensors

Accuracies are fractions of the held-out items (the readers': one per initialisation, as a single read
trains unevenly); one run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flamingo_lab.data.shards import image_to_tensor  # noqa: E402
from flamingo_lab.data.world import WorldConfig, make_question, render_scene, sample_scene  # noqa: E402
from flamingo_lab.models.config import VisionConfig  # noqa: E402
from flamingo_lab.models.vision import VisionEncoder  # noqa: E402


def tokens(enc: VisionEncoder, images: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([enc(torch.stack(images[i:i + 256])[:, None, None])[:, 0, 0]
                          for i in range(0, len(images), 256)])  # (n, N, D)


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> nn.Linear:
    lin = nn.Linear(x.shape[-1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lin


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((logits.argmax(-1) == y).float().mean()), 3)


class Reader(nn.Module):
    """One attention read over a frame's tokens; the query is the named object's colour + shape."""

    def __init__(self, dim: int, n_tokens: int, n_colours: int, n_shapes: int, spatial: bool, width: int = 64):
        super().__init__()
        self.colour, self.shape = nn.Embedding(n_colours, width), nn.Embedding(n_shapes, width)
        self.norm, self.k, self.v = nn.LayerNorm(dim), nn.Linear(dim, width), nn.Linear(dim, width)
        self.spatial = nn.Parameter(torch.randn(n_tokens, dim) * 0.02) if spatial else None
        self.out = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))

    def forward(self, t: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        x = self.norm(t if self.spatial is None else t + self.spatial)
        q = self.colour(colour) + self.shape(shape)
        attn = torch.einsum("bd,bnd->bn", q, self.k(x)).softmax(-1)
        return self.out(torch.einsum("bn,bnd->bd", attn, self.v(x)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="data/embedded", help="a world folder (its world.json)")
    ap.add_argument("--vision", default="nfnet_f6")
    ap.add_argument("--checkpoint", default="data/embedded/cache/vision-61ac9c6afb92/encoder.safetensors")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--steps", type=int, default=1500, help="reader training steps (batch 128)")
    ap.add_argument("--inits", type=int, default=3, help="reader initialisations (seeds 0..inits-1), each reported")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = WorldConfig(**json.loads((Path(args.world) / "world.json").read_text())["config"])
    size = cfg.image_size
    enc = VisionEncoder(VisionConfig(name=args.vision, size="small", image_size=size, checkpoint=args.checkpoint))
    side = int(round(enc.num_tokens ** 0.5))
    out: dict = {"vision": args.vision, "checkpoint": args.checkpoint, "grid": f"{side}x{side}"}

    def singles(n, seed):
        rng = random.Random(seed)
        scenes = [sample_scene(rng, cfg, n=1) for _ in range(n)]
        return tokens(enc, [image_to_tensor(render_scene(s, cfg), size) for s in scenes]), \
            torch.tensor([s.objects[0].cell for s in scenes])

    def questions(n, seed, held):
        rng = random.Random(seed)
        imgs, colour, shape, cell = [], [], [], []
        for _ in range(n):
            scene, q, _ = make_question(rng, cfg, "position", held)
            o = next(o for o in scene.objects if f"where is the {o.colour} {o.shape}?" == q)
            imgs.append(image_to_tensor(render_scene(scene, cfg), size))
            colour.append(cfg.colours.index(o.colour))
            shape.append(cfg.shapes.index(o.shape))
            cell.append(o.cell)
        return tokens(enc, imgs), torch.tensor(colour), torch.tensor(shape), torch.tensor(cell)

    (tr, tr_cell), (te, te_cell) = singles(args.train, 1), singles(args.test, 2)
    norm = lambda t: F.layer_norm(t, t.shape[-1:])  # noqa: E731
    n = enc.num_tokens
    for name, of in (("token_row", lambda i: i // side), ("token_col", lambda i: i % side)):
        y_tr, y_te = of(torch.arange(n)).repeat(len(tr)), of(torch.arange(n)).repeat(len(te))
        lin = fit_linear(norm(tr).flatten(0, 1), y_tr, side)
        out[name] = accuracy(lin(norm(te).flatten(0, 1)), y_te)
    lin = fit_linear(norm(tr.mean(1)), tr_cell, 4, steps=500)
    out["single_cell"] = accuracy(lin(norm(te.mean(1))), te_cell)

    train = questions(args.train, 3, False)
    tests = {"held_out": questions(args.test, 4, True), "seen": questions(args.test, 5, False)}
    for spatial in (False, True):
        name = "reader_spatial" if spatial else "reader"
        out[name] = {k: [] for k in tests}  # one accuracy per initialisation
        for init in range(args.inits):
            torch.manual_seed(init)
            reader = Reader(enc.dim, n, len(cfg.colours), len(cfg.shapes), spatial)
            opt = torch.optim.Adam(reader.parameters(), 3e-3)
            for _ in range(args.steps):
                b = torch.randint(len(train[0]), (128,))
                loss = F.cross_entropy(reader(train[0][b], train[1][b], train[2][b]), train[3][b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, t in tests.items():
                    out[name][k].append(accuracy(reader(*t[:3]), t[3]))
    out["chance"] = {"token_row": round(1 / side, 3), "single_cell": 0.25, "reader": 0.25}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
