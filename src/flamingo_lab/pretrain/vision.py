"""Vision pretraining stage: image-text pretraining of the chosen encoder on the world's pairs.

The paper's NFNet-F6 is pretrained contrastively on image-text pairs (ALIGN + LTIP) before it is
frozen; at the embedded scale this stage does the same for whichever encoder ``model.vision`` names.
Objectives (``settings.objective``):

- ``contrastive``: CLIP-style two-way InfoNCE between the encoder's pooled output and a small text
  tower over the world's tokenizer, with a learned temperature.
- ``supervised``: per-object attributes from the scene metadata: for each cell of the 2x2 grid, its
  colour, shape and size (or "none"), read by linear heads from the token grid pooled per cell, so the
  tokens the Flamingo gets are themselves informative (the prototype that worked,
  embedded-feasibility.md). The text tower still trains (on the encoder's detached output), so the
  zero-shot check runs for every objective.
- ``both`` (default): the sum.

Its log checks that the encoder learned something real: zero-shot naming of the colour and shape of
a single object drawn fresh from the world, held-out colour-shape pairs included, through the text
tower (every colour x shape caption scored, argmax), next to the chance levels.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

OBJECTIVES = ("contrastive", "supervised", "both")
PAIR_SOURCES = ("ltip", "align")  # the paper's image-text pairs for contrastive pretraining
CELLS = 4  # the world's 2x2 grid
MIRROR = [1, 0, 3, 2]  # cell i of a left-right mirrored image was cell MIRROR[i]

#: Settings this stage reads beyond objective/steps/batch_size/lr/seed/bf16, with their defaults.
DEFAULTS: dict[str, Any] = {
    "sources": list(PAIR_SOURCES),
    "warmup": 50,
    "weight_decay": 0.05,
    "text_len": 40,  # caption tokens (fixed shape); longer captions are cut
    "text_width": 128,
    "text_layers": 0,  # 0: mean-pooled word embeddings (a bag of words: composes unseen colour-shape pairs)
    "embed_dim": 128,  # joint image-text space
    "supervised_weight": 1.0,
    # Colour-blind views, so that shape is learnt apart from colour (no training image shows a held-out
    # colour-shape pair, and a classifier otherwise learns "red, so not a triangle"): shares of each
    # batch shown in greyscale / with their RGB channels permuted; their colour words and colour
    # targets are dropped.
    "grey": 0.0,
    "permute": 0.5,
    # Shape-blind views, so that colour is learnt apart from shape (the other half of the same problem: a
    # classifier learns "a triangle, so not red"): a share of each batch with the pixels of each grid cell
    # shuffled (the cell's colours stay, its shapes go); their shape words and shape targets are dropped.
    "scramble": 0.0,
    # A label-preserving view: mirror left-right, the cells and the words left/right swapped with it.
    # (Shifting by 2 px with repeated edges was tried and hurt: shape accuracy fell by a third.)
    "flip": 0.5,
    "n_eval": 300,  # fresh single-object scenes per check (held-out and seen)
}

#: Zero-shot class prompts, averaged per (colour, shape) as CLIP's prompt ensembles are.
PROMPTS = ("a {colour} {shape}.", "a {size} {colour} {shape}.", "a {size} {colour} {shape} in the {cell}.")


# ---------------------------------------------------------------------------------------------
# Data: every pair decoded once into tensors
# ---------------------------------------------------------------------------------------------


def _scene_targets(scene: dict, colours: list[str], shapes: list[str], sizes: list[str]) -> torch.Tensor:
    """(CELLS, 3) per cell: colour, shape and size index; the last index of each means 'empty'."""
    t = torch.tensor([[len(colours), len(shapes), len(sizes)]] * CELLS)
    for o in scene["objects"]:
        t[o["cell"]] = torch.tensor([colours.index(o["colour"]), shapes.index(o["shape"]), sizes.index(o["size"])])
    return t


def encode_texts(tokenizer, texts: list[str], text_len: int, drop: set[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, text_len) token ids (padded, cut; ids in ``drop`` left out) and their mask."""
    ids = torch.full((len(texts), text_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), text_len), dtype=torch.bool)
    for i, t in enumerate(texts):
        tok = [j for j in tokenizer(t, add_special_tokens=True)["input_ids"] if j not in drop][:text_len]
        ids[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(tok)] = True  # by length, not `ids != pad`: a tokenizer whose pad is its eos (GPT-2, Llama)
    return ids, mask


def load_pairs(world: dict, split: str, sources: list[str], tokenizer, image_size: int, text_len: int) -> dict:
    """Decode the pair shards of ``split`` into images (N, 3, H, W), captions (N, text_len) and targets (N, CELLS, 3).

    Shards are read as training reads them (``shards.read_shard``): a damaged sample, or the rest of a
    shard cut short, is skipped, counted per reason in ``skipped`` and logged, so the stage's report says
    what it did not train on; a pair without image, caption or scene counts as bad_image / missing_text /
    bad_json."""
    from flamingo_lab.data.shards import SkipCounter, SkipSample, decode_sample, image_to_tensor, read_shard

    cfg = world["config"]
    skipped = SkipCounter(f"{split} pairs")
    images, texts, targets = [], [], []
    for source in sources:
        for url in world["shards"][split].get(source, []):
            for raw in read_shard(url, skipped.skip):
                what = f"sample {url}:{raw.get('__key__')}"
                try:
                    s = decode_sample(raw)
                    if "png" not in s:
                        raise SkipSample("bad_image", "the pair has no png image")
                    if not s.get("txt"):
                        raise SkipSample("missing_text", "the pair has no caption")
                    if "scene" not in (s.get("json") or {}):
                        raise SkipSample("bad_json", "the pair's json has no scene")
                except SkipSample as exn:
                    skipped.skip(what, exn)
                    continue
                images.append(image_to_tensor(s["png"], image_size))
                texts.append(s["txt"].strip())
                targets.append(_scene_targets(s["json"]["scene"], cfg["colours"], cfg["shapes"], cfg["sizes"]))
    if not images:
        raise ValueError(f"the world at {world['root']} has no usable {split} image-text pairs in sources {sources}"
                         f" (skipped: {dict(skipped.by_reason)}); rewrite it with flamingo-data")
    if skipped.count:
        log.warning("vision pretraining: %d %s pairs skipped (%s); the stage trains on the %d left. Rewrite the "
                    "world with flamingo-data to train on all of them", skipped.count, split,
                    dict(skipped.by_reason), len(images))
    ids, mask = encode_texts(tokenizer, texts, text_len)
    colour_ids = set(tokenizer.convert_tokens_to_ids(list(cfg["colours"])))
    grey_ids, grey_mask = encode_texts(tokenizer, texts, text_len, drop=colour_ids)  # captions for greyscale views
    shape_ids = set(tokenizer.convert_tokens_to_ids(list(cfg["shapes"])))
    shapeless_ids, shapeless_mask = encode_texts(tokenizer, texts, text_len, drop=shape_ids)  # for scrambled views
    return {"images": torch.stack(images), "ids": ids, "mask": mask, "targets": torch.stack(targets),
            "grey_ids": grey_ids, "grey_mask": grey_mask, "shapeless_ids": shapeless_ids,
            "shapeless_mask": shapeless_mask, "skipped": dict(skipped.by_reason)}


def permute_channels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) with each image's RGB channels in a random order (never the identity)."""
    perms = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    order = perms[torch.randint(len(perms), (len(x),), generator=generator)]  # (B, 3)
    return torch.gather(x, 1, order[:, :, None, None].expand_as(x))


def scramble_cells(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) with the pixels of each cell of the 2x2 grid shuffled (one permutation per image and cell):
    every cell keeps its colours and loses its shapes."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    out = x.clone()
    for r in range(2):
        for c in range(2):
            cell = x[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w].reshape(B, C, h * w)
            order = torch.argsort(torch.rand(B, h * w, generator=generator), dim=1)
            cell = torch.gather(cell, 2, order[:, None, :].expand(B, C, h * w))
            out[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w] = cell.reshape(B, C, h, w)
    return out


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the same images in greyscale (luma), still 3 channels."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)


# ---------------------------------------------------------------------------------------------
# The towers around the encoder
# ---------------------------------------------------------------------------------------------


class TextTower(nn.Module):
    """Token ids (B, L) -> unit text embeddings (B, E): word + position embeddings, a few transformer
    layers (none: a bag of words), masked mean pooling, a projection."""

    def __init__(self, vocab_size: int, width: int, layers: int, text_len: int, embed_dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(text_len, width)) if layers else None
        layer = nn.TransformerEncoderLayer(width, max(1, width // 32), 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)  # (B, L, W)
        if self.blocks is not None:
            x = self.blocks(x + self.pos[: ids.shape[1]], src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        x = (self.ln(x) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, W)
        return F.normalize(self.proj(x).float(), dim=-1)  # (B, E)


def grid_tokens(encoder: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """forward_features output -> the token grid (B, D, h, w), as VisionEncoder's tokens are laid out."""
    if feats.ndim == 4:  # conv grid (B, C, h, w)
        return feats
    x = feats[:, getattr(encoder, "num_prefix_tokens", 0):]  # (B, N, D)
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"the encoder gives {x.shape[1]} tokens, not a square grid: cannot read cells")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # (B, D, h, w)


class AttributeHeads(nn.Module):
    """Token grid (B, D, h, w) -> per cell of the 2x2 grid, logits for colour, shape and size (+ empty)."""

    def __init__(self, dim: int, n_colours: int, n_shapes: int, n_sizes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, n + 1) for n in (n_colours, n_shapes, n_sizes))

    def forward(self, grid: torch.Tensor) -> list[torch.Tensor]:
        cells = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, CELLS, D), reading order
        cells = self.norm(cells)
        return [head(cells) for head in self.heads]  # each (B, CELLS, n + 1)


class ImageText(nn.Module):
    """The encoder being pretrained, with what only pretraining needs: an image projection, a text
    tower, a learned temperature and per-cell attribute heads."""

    def __init__(self, encoder: nn.Module, text: TextTower, dim: int, embed_dim: int, n_attrs: tuple[int, int, int]):
        super().__init__()
        self.encoder, self.text = encoder, text
        self.img_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.heads = AttributeHeads(dim, *n_attrs)

    def image(self, x: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (unit image embeddings (B, E), token grid (B, D, h, w))."""
        feats = self.encoder.forward_features(x)
        pooled = self.encoder.forward_head(feats)  # (B, D): the encoder's own pooled output
        if detach:
            pooled = pooled.detach()
        return F.normalize(self.img_proj(pooled).float(), dim=-1), grid_tokens(self.encoder, feats)

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()  # (B_img, B_txt)


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Two-way InfoNCE: image -> text and text -> image, the pair on the diagonal."""
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def attribute_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over cells and attributes; targets (B, CELLS, 3)."""
    return sum(F.cross_entropy(lg.flatten(0, 1).float(), targets[..., i].flatten()) for i, lg in enumerate(logits)) / len(logits)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def single_objects(world_cfg, n: int, held: bool, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """``n`` fresh one-object scenes (held-out colour-shape pairs if ``held``): images and objects."""
    from flamingo_lab.data.shards import image_to_tensor
    from flamingo_lab.data.world import render_scene, sample_scene

    rng = random.Random(f"{world_cfg.seed}/vision-check/{seed}/{held}")
    images, objects = [], []
    for _ in range(n):
        scene = sample_scene(rng, world_cfg, n=1, held=held)
        images.append(image_to_tensor(render_scene(scene, world_cfg), world_cfg.image_size))
        o = scene.objects[0]
        objects.append({"colour": o.colour, "shape": o.shape, "size": o.size, "cell": o.cell})
    return torch.stack(images), objects


@torch.no_grad()
def zero_shot(model: ImageText, tokenizer, world_cfg, images: torch.Tensor, objects: list[dict], text_len: int) -> dict:
    """Name each single object's colour and shape through the text tower: argmax over every colour x shape."""

    classes = [(c, s) for c in world_cfg.colours for s in world_cfg.shapes]
    prompts = [p.format(colour=c, shape=s, size=z, cell=cell) for c, s in classes for p in PROMPTS
               for z in world_cfg.sizes for cell in world_cfg.cell_names()]
    per_class = len(prompts) // len(classes)
    ids, mask = encode_texts(tokenizer, prompts, text_len)
    txt = model.text(ids, mask).view(len(classes), per_class, -1).mean(1)  # (classes, E)
    txt = F.normalize(txt, dim=-1)
    img, _ = model.image(images)
    pred = [classes[i] for i in (img @ txt.t()).argmax(-1).tolist()]
    colour = [p[0] == o["colour"] for p, o in zip(pred, objects)]
    shape = [p[1] == o["shape"] for p, o in zip(pred, objects)]
    out = {"colour": _mean(colour), "shape": _mean(shape), "both": _mean([a and b for a, b in zip(colour, shape)]),
           "n": len(objects)}
    for z in world_cfg.sizes:  # small objects are a few pixels wide at 32 px: the hard half
        keep = [o["size"] == z for o in objects]
        out[f"shape_{z}"] = _mean([s for s, k in zip(shape, keep) if k])
    return out


@torch.no_grad()
def head_accuracy(model: ImageText, world_cfg, images: torch.Tensor, objects: list[dict]) -> dict:
    """The attribute heads on each object's own cell (how linearly the token grid holds colour and shape)."""
    _, grid = model.image(images)
    colour, shape, _ = (lg.argmax(-1) for lg in model.heads(grid))  # (B, CELLS) each
    cell = torch.tensor([o["cell"] for o in objects])
    rows = torch.arange(len(objects))
    c_ok = colour[rows, cell] == torch.tensor([world_cfg.colours.index(o["colour"]) for o in objects])
    s_ok = shape[rows, cell] == torch.tensor([world_cfg.shapes.index(o["shape"]) for o in objects])
    return {"colour": float(c_ok.float().mean()), "shape": float(s_ok.float().mean()),
            "both": float((c_ok & s_ok).float().mean()), "n": len(objects)}


@torch.no_grad()
def retrieval(model: ImageText, pairs: dict) -> dict:
    """Recall@1 among the validation pairs, image -> text and text -> image (chance 1/N)."""
    img, _ = model.image(pairs["images"])
    txt = model.text(pairs["ids"], pairs["mask"])
    sim = img @ txt.t()
    target = torch.arange(len(sim))
    return {"image_to_text_r1": float((sim.argmax(1) == target).float().mean()),
            "text_to_image_r1": float((sim.argmax(0) == target).float().mean()),
            "n": len(sim), "chance": 1 / len(sim)}


@torch.no_grad()
def cell_accuracy(model: ImageText, pairs: dict) -> dict:
    """Attribute heads on the validation pairs, every cell (empty ones included)."""
    _, grid = model.image(pairs["images"])
    out = {}
    for name, lg, i in zip(("colour", "shape", "size"), model.heads(grid), range(3)):
        out[name] = float((lg.argmax(-1) == pairs["targets"][..., i]).float().mean())
    return out


def _mean(xs: list[bool]) -> float:
    return sum(xs) / max(len(xs), 1)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def pretrain_vision(vision_cfg: dict, world: dict, settings: dict, out_dir: Path, progress: bool = True) -> dict:
    """Pretrain ``vision_cfg``'s encoder on the world's pairs, check it, save ``encoder.safetensors``
    (the timm model's state dict, as ``models.vision.load_checkpoint`` reads it) into ``out_dir``;
    return the report."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from flamingo_lab.data.world import WorldConfig
    from flamingo_lab.models.config import VisionConfig
    from flamingo_lab.models.vision import create_timm_model

    started = time.perf_counter()
    opts = {**DEFAULTS, **settings}
    objective = opts.get("objective", "both")
    if objective not in OBJECTIVES:
        raise ValueError(f"pretrain.vision.objective must be one of {list(OBJECTIVES)}; got {objective!r}")
    seed, steps, batch = int(opts.get("seed", 0)), int(opts["steps"]), int(opts["batch_size"])
    torch.manual_seed(seed)
    vcfg = VisionConfig(**{k: v for k, v in vision_cfg.items() if k != "checkpoint"})
    world_cfg = WorldConfig(**world["config"])
    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    text_len = int(opts["text_len"])
    train = load_pairs(world, "train", list(opts["sources"]), tokenizer, vcfg.image_size, text_len)
    val = load_pairs(world, "val", list(opts["sources"]), tokenizer, vcfg.image_size, text_len)
    load_s = time.perf_counter() - started

    encoder = create_timm_model(vcfg)
    dim = encoder.num_features
    text = TextTower(len(tokenizer), int(opts["text_width"]), int(opts["text_layers"]), text_len, int(opts["embed_dim"]))
    n_attrs = (len(world_cfg.colours), len(world_cfg.shapes), len(world_cfg.sizes))
    model = ImageText(encoder, text, dim, int(opts["embed_dim"]), n_attrs)

    contrastive = objective in ("contrastive", "both")
    supervised = objective in ("supervised", "both")
    sup_w = float(opts["supervised_weight"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("text.tok")]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith("text.tok"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(opts["weight_decay"])},
                             {"params": other, "weight_decay": 0.0}], lr=float(opts["lr"]), betas=(0.9, 0.98))
    warmup = int(opts["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    gen = torch.Generator().manual_seed(seed)
    n = len(train["images"])
    if batch > n:
        raise ValueError(f"pretrain.vision.batch_size={batch} is more than the {n} training pairs; lower it")
    bf16 = bool(opts.get("bf16", False))

    flip_p = float(opts["flip"])
    left, right = tokenizer.convert_tokens_to_ids(["left", "right"])
    n_grey = round(float(opts["grey"]) * batch)  # fixed counts: fixed shapes
    n_perm = round(float(opts["permute"]) * batch)
    n_scramble = round(float(opts.get("scramble", 0.0)) * batch)
    if n_grey + n_perm + n_scramble > batch:
        raise ValueError(f"pretrain.vision.grey + permute + scramble must be <= 1; got {opts['grey']} + "
                         f"{opts['permute']} + {opts.get('scramble', 0.0)}")

    def losses(idx: torch.Tensor, grey: int = 0, perm: int = 0, scramble: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        images, ids, mask = train["images"][idx], train["ids"][idx], train["mask"][idx]
        targets = train["targets"][idx]
        blind = grey + perm
        if blind:  # the first `blind` pairs: no true colour in the image, the caption or the targets
            images[:grey] = to_grey(images[:grey])
            images[grey:blind] = permute_channels(images[grey:blind], gen)
            ids[:blind], mask[:blind] = train["grey_ids"][idx[:blind]], train["grey_mask"][idx[:blind]]
            occupied = targets[:blind, :, 0] != n_attrs[0]
            targets[:blind, :, 0][occupied] = -100  # ignored by cross_entropy
        if scramble:  # the next `scramble` pairs: no shapes in the image, the caption or the targets
            sl = slice(blind, blind + scramble)
            images[sl] = scramble_cells(images[sl], gen)
            ids[sl], mask[sl] = train["shapeless_ids"][idx[sl]], train["shapeless_mask"][idx[sl]]
            occupied = targets[sl, :, 1] != n_attrs[1]
            targets[sl, :, 1][occupied] = -100
        if flip_p:
            flip = torch.rand(len(idx), generator=gen) < flip_p
            images[flip] = images[flip].flip(-1)
            targets[flip] = targets[flip][:, MIRROR]
            swapped = torch.where(ids == left, right, torch.where(ids == right, left, ids))
            ids = torch.where(flip[:, None], swapped, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img, grid = model.image(images, detach=not contrastive)
            txt = model.text(ids, mask)
            l_clip = clip_loss(model.logits(img, txt))
            l_sup = attribute_loss(model.heads(grid), targets) if supervised else torch.zeros(())
        return l_clip, l_sup

    model.eval()
    with torch.no_grad():
        probe = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:batch]
        initial = [float(x) for x in losses(probe)]
    model.train()
    curve: list[list[float]] = []
    bar = tqdm(range(steps), desc=f"pretrain vision {vcfg.name}", disable=not progress, mininterval=1.0)
    t_train = time.perf_counter()
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:batch]  # distinct pairs: no false negatives from repeats
        l_clip, l_sup = losses(idx, n_grey, n_perm, n_scramble)
        loss = l_clip + sup_w * l_sup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append([l_clip.item(), l_sup.item()])
        if step % 50 == 0:
            recent = curve[-50:]
            bar.set_postfix(clip=f"{sum(c[0] for c in recent) / len(recent):.3f}",
                            sup=f"{sum(c[1] for c in recent) / len(recent):.3f}")
    train_s = time.perf_counter() - t_train
    model.eval()
    with torch.no_grad():
        final = [float(x) for x in losses(probe)]

    n_eval = int(opts["n_eval"])
    checks = {}
    for name, held in (("held_out", True), ("seen", False)):
        images, objects = single_objects(world_cfg, n_eval, held, seed)
        checks[name] = (zero_shot(model, tokenizer, world_cfg, images, objects, text_len),
                        head_accuracy(model, world_cfg, images, objects))
    chance = {"colour": 1 / len(world_cfg.colours), "shape": 1 / len(world_cfg.shapes),
              "both": 1 / (len(world_cfg.colours) * len(world_cfg.shapes))}
    report = {
        "stage": "vision",
        "vision": vision_cfg,
        "settings": opts,  # with the defaults this stage filled in
        "objective": objective,
        "steps": steps,
        "batch_size": batch,
        "n_pairs": {"train": n, "val": len(val["images"])},
        "skipped": {"train": train["skipped"], "val": val["skipped"]},  # damaged pairs left out, per reason
        "load_seconds": round(load_s, 1),
        "train_seconds": round(train_s, 1),
        "step_ms": round(1000 * train_s / max(steps, 1), 1),
        "parameters": {"encoder": sum(p.numel() for p in encoder.parameters()),
                       "text_tower": sum(p.numel() for p in text.parameters()),
                       "heads": sum(p.numel() for p in model.heads.parameters())},
        "loss": {"contrastive_initial": initial[0], "contrastive_final": final[0],
                 "supervised_initial": initial[1] if supervised else None,
                 "supervised_final": final[1] if supervised else None,
                 "curve_every_step": curve},
        "temperature": float(1 / model.logit_scale.detach().clamp(max=math.log(100)).exp()),
        "zero_shot": {"held_out": checks["held_out"][0], "seen": checks["seen"][0], "chance": chance,
                      "via": "text tower, argmax over every colour x shape, prompt ensemble",
                      "text_tower_trained_on": "encoder output" if contrastive else "detached encoder output",
                      "prompts": list(PROMPTS)},
        "heads": {"held_out": checks["held_out"][1], "seen": checks["seen"][1],
                  "val_cells": cell_accuracy(model, val), "trained": supervised},
        "retrieval": retrieval(model, val),
    }
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(out_dir / "encoder.safetensors"))
    towers = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file({k: v.detach().contiguous() for k, v in towers.items()}, str(out_dir / "towers.safetensors"))
    report["seconds"] = round(time.perf_counter() - started, 1)
    zs = report["zero_shot"]["held_out"]
    log.info("vision pretraining (%s, %s): held-out single objects zero-shot colour %.2f shape %.2f both %.2f "
             "(chance %.2f / %.2f / %.2f), %d steps, %.0f s", vcfg.name, objective, zs["colour"], zs["shape"],
             zs["both"], chance["colour"], chance["shape"], chance["both"], steps, report["seconds"])
    return report
