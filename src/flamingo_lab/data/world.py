"""The embedded world: small coloured shapes, their captions and interleaved pages about them.

Everything is a pure function of ``WorldConfig.seed``: every sample draws from its own
``random.Random`` seeded by (seed, split, source, index), so adding a source or changing one
count leaves every other sample as it was, and the same seed writes byte-identical shards.

Two sources, in the paper's two formats:

- ``pairs`` (ALIGN/LTIP-like): one image and its caption ("a big red circle left of a small blue
  square.").
- ``docs`` (M3W/MMC4-like): a page of running text with 2-5 images; each image's text comes after
  it, and the page ends with sentences over all its images (a count, a comparison).

``write_world(cfg, out_dir)`` writes WebDataset shards, a word-level tokenizer and ``world.json``
(written last: a folder without it is an unfinished world and readers refuse it).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

WORLD_FORMAT = "flamingo-lab-world/1"
MANIFEST = "world.json"
SPLITS = ("train", "val")
SOURCES = ("pairs", "docs")
MTIME = 946684800.0  # fixed tar member time (2000-01-01) so the same seed gives the same bytes

# ---------------------------------------------------------------------------------------------
# Registries: the world's vocabulary of things. A later world adds entries here, not code paths.
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _square(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    h = r * 0.85
    d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)


def _triangle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)


def _star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    d.polygon(pts, fill=fill)


def _cross(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    w = r * 0.35
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


SHAPES: dict[str, Callable] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
}

SIZES: dict[str, float] = {"small": 0.45, "big": 0.85}  # object radius as a fraction of half a cell

CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # 2x2 grid, reading order
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def list_shapes() -> list[str]:
    return list(SHAPES)


def list_colours() -> list[str]:
    return list(COLOURS)


def list_sizes() -> list[str]:
    return list(SIZES)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    name: str = "embedded"
    seed: int = 0
    image_size: int = 32  # the prototypes' size: big enough for 1-3 shapes on a 2x2 grid
    supersample: int = 4  # draw at image_size * supersample, then downsample (anti-aliasing)
    n_train_pairs: int = 4000
    n_train_docs: int = 2000
    n_val_pairs: int = 200
    n_val_docs: int = 100
    shard_size: int = 1000  # at most this many samples per shard ...
    min_shards: int = 4  # ... and at least this many shards per split and source (nodes x workers)
    min_objects: int = 1
    max_objects: int = 3
    min_images_per_doc: int = 2  # M3W pages hold a few images; the paper trains on up to 5
    max_images_per_doc: int = 5
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star"])
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple"])
    sizes: list[str] = field(default_factory=lambda: ["small", "big"])
    background_jitter: int = 12  # +- per channel around a dark grey; 0 gives a plain background

    def __post_init__(self):
        self.shapes = list(self.shapes)
        self.colours = list(self.colours)
        self.sizes = list(self.sizes)
        for what, chosen, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES),
        ):
            unknown = [c for c in chosen if c not in known]
            if unknown or not chosen:
                raise ValueError(
                    f"world.{what} must be a non-empty subset of {sorted(known)}; got {chosen} "
                    f"(unknown: {unknown})"
                )
        if self.image_size < 8:
            raise ValueError(f"world.image_size must be >= 8 pixels; got {self.image_size}")
        if self.supersample < 1:
            raise ValueError(f"world.supersample must be >= 1 (1 draws at image_size); got {self.supersample}")
        for k in ("n_train_pairs", "n_train_docs", "n_val_pairs", "n_val_docs"):
            if getattr(self, k) < 0:
                raise ValueError(f"world.{k} must be >= 0; got {getattr(self, k)}")
        if self.shard_size < 1 or self.min_shards < 1:
            raise ValueError(
                f"world.shard_size and world.min_shards must be >= 1; got {self.shard_size}, {self.min_shards}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(
                "world needs 1 <= min_objects <= max_objects <= 4 (one object per cell of the 2x2 grid); "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 1 <= self.min_images_per_doc <= self.max_images_per_doc <= len(ORDINALS):
            raise ValueError(
                f"world needs 1 <= min_images_per_doc <= max_images_per_doc <= {len(ORDINALS)}; got "
                f"{self.min_images_per_doc}, {self.max_images_per_doc} (the paper uses up to 5)"
            )
        if not 0 <= self.background_jitter <= 40:
            raise ValueError(f"world.background_jitter must be in [0, 40]; got {self.background_jitter}")

    def count(self, split: str, source: str) -> int:
        return getattr(self, f"n_{split}_{source}")

    def n_shards(self, split: str, source: str) -> int:
        n = self.count(split, source)
        if n == 0:
            return 0
        return min(n, max(self.min_shards, math.ceil(n / self.shard_size)))


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..3 on the 2x2 grid, reading order

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int]
    jitter: list[tuple[float, float]]  # per object, offset from the cell centre in cell fractions

    def meta(self) -> dict:
        return {
            "objects": [
                {**asdict(o), "position": CELL_NAMES[o.cell]} for o in self.objects
            ],
            "n_objects": len(self.objects),
            "background": list(self.background),
        }


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(4), n))
    objects = [Obj(rng.choice(cfg.shapes), rng.choice(cfg.colours), rng.choice(cfg.sizes), c) for c in cells]
    base = 50
    j = cfg.background_jitter
    background = tuple(base + rng.randint(-j, j) for _ in range(3))
    jitter = [
        (0.0, 0.0) if o.size == "big" else (rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)) for o in objects
    ]
    return Scene(objects, background, jitter)


def render_scene(scene: Scene, cfg: WorldConfig) -> Image.Image:
    big = cfg.image_size * cfg.supersample
    img = Image.new("RGB", (big, big), scene.background)
    d = ImageDraw.Draw(img)
    half = big / 4  # half a cell
    for o, (jx, jy) in zip(scene.objects, scene.jitter):
        row, col = divmod(o.cell, 2)
        cx = (2 * col + 1) * half + jx * 2 * half
        cy = (2 * row + 1) * half + jy * 2 * half
        SHAPES[o.shape](d, cx, cy, SIZES[o.size] * half, COLOURS[o.colour])
    if cfg.supersample > 1:
        img = img.resize((cfg.image_size, cfg.image_size), Image.BOX)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no timestamps in PNG: deterministic bytes
    return buf.getvalue()


def _relation(a: Obj, b: Obj) -> str:
    ra, ca = divmod(a.cell, 2)
    rb, cb = divmod(b.cell, 2)
    if ra == rb:
        return "left of" if ca < cb else "right of"
    if ca == cb:
        return "above" if ra < rb else "below"
    return ("above and left of" if ca < cb else "above and right of") if ra < rb else (
        "below and left of" if ca < cb else "below and right of"
    )


def describe(scene: Scene) -> str:
    """One sentence (no final full stop) naming every object and where it stands."""
    objs = scene.objects
    if len(objs) == 1:
        return f"{objs[0].phrase()} in the {CELL_NAMES[objs[0].cell]}"
    if len(objs) == 2:
        return f"{objs[0].phrase()} {_relation(objs[0], objs[1])} {objs[1].phrase()}"
    parts = [f"{o.phrase()} in the {CELL_NAMES[o.cell]}" for o in objs]
    return f"{NUMBER_WORDS[len(objs)]} shapes: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    return describe(scene) + "."


# ---------------------------------------------------------------------------------------------
# Interleaved documents (MMC4 layout: sentences, and images matched to the sentence after them)
# ---------------------------------------------------------------------------------------------

_INTROS = ("look at these pictures.", "a page about shapes.", "here are some pictures of shapes.")
_LEADS = ("here is {}.", "this picture shows {}.", "next, {}.", "we see {}.")


def make_doc(rng: random.Random, scenes: list[Scene]) -> tuple[list[str], list[int]]:
    """Return ``(text_list, matched_text_index per image)`` for a page showing ``scenes``.

    An image's text comes after it: image i stands before sentence ``matched[i]``, and the
    sentences up to the next image are about it. The page ends with sentences over all images.
    """
    text: list[str] = []
    matched: list[int] = []
    if rng.random() < 0.3:
        text.append(rng.choice(_INTROS))
    for s in scenes:
        matched.append(len(text))
        text.append(rng.choice(_LEADS).format(describe(s)))
        if rng.random() < 0.5:
            n = len(s.objects)
            text.append(f"it has {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}.")
    # sentences over the whole page: a count and a comparison, placed after the last image
    total = sum(len(s.objects) for s in scenes)
    text.append(f"in all there are {NUMBER_WORDS[total]} shapes on this page.")
    counts = [len(s.objects) for s in scenes]
    if max(counts) > min(counts) and counts.count(max(counts)) == 1:
        text.append(f"the {ORDINALS[counts.index(max(counts))]} picture has the most shapes.")
    else:
        colour = rng.choice([o.colour for o in scenes[0].objects])
        k = sum(any(o.colour == colour for o in s.objects) for s in scenes)
        text.append(f"{NUMBER_WORDS[k]} of the pictures show a {colour} shape.")
    return text, matched


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def _rng(cfg: WorldConfig, split: str, source: str, index: int) -> random.Random:
    return random.Random(f"{cfg.seed}/{split}/{source}/{index}")  # str seeds hash with sha512: stable


def make_pair(cfg: WorldConfig, split: str, index: int) -> dict:
    rng = _rng(cfg, split, "pairs", index)
    scene = sample_scene(rng, cfg)
    cap = caption(scene)
    meta = {**scene.meta(), "split": split, "index": index}
    return {
        "__key__": f"{split}-pair-{index:07d}",
        "png": png_bytes(render_scene(scene, cfg)),
        "txt": cap,
        "json": meta,
    }


def make_doc_sample(cfg: WorldConfig, split: str, index: int) -> dict:
    rng = _rng(cfg, split, "docs", index)
    n_img = rng.randint(cfg.min_images_per_doc, cfg.max_images_per_doc)
    scenes = [sample_scene(rng, cfg) for _ in range(n_img)]
    text_list, matched = make_doc(rng, scenes)
    sample = {"__key__": f"{split}-doc-{index:07d}"}
    image_info = []
    for i, (s, m) in enumerate(zip(scenes, matched)):
        sample[f"{i}.png"] = png_bytes(render_scene(s, cfg))
        image_info.append({"matched_text_index": m, "image_name": f"{i}.png", "scene": s.meta()})
    sample["json"] = {"text_list": text_list, "image_info": image_info, "split": split, "index": index}
    return sample


MAKERS: dict[str, Callable[[WorldConfig, str, int], dict]] = {"pairs": make_pair, "docs": make_doc_sample}


def sample_texts(sample: dict) -> list[str]:
    """The text a sample holds (for the tokenizer)."""
    if "txt" in sample:
        return [sample["txt"]]
    return list(sample["json"]["text_list"])


def encode_sample(sample: dict) -> dict:
    """Members as bytes, ready for ``TarWriter(encoder=False)`` (json with sorted keys: stable bytes)."""
    out = {}
    for k, v in sample.items():
        if k == "__key__":
            out[k] = v
        elif isinstance(v, (bytes, bytearray)):
            out[k] = bytes(v)
        elif isinstance(v, str):
            out[k] = v.encode("utf-8")
        else:
            out[k] = json.dumps(v, sort_keys=True).encode("utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _shard_ranges(n: int, n_shards: int) -> list[range]:
    bounds = [round(i * n / n_shards) for i in range(n_shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n_shards)]


def _clear_old(out_dir: Path) -> None:
    """Remove what a previous write_world left (only our own files)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for source in SOURCES:
            for p in (out_dir / split).glob(f"{source}-*.tar"):
                p.unlink()
    tok = out_dir / "tokenizer"
    if tok.is_dir():
        for p in tok.iterdir():
            if p.is_file():
                p.unlink()


def write_world(cfg: WorldConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Write the world's shards, tokenizer and ``world.json`` to ``out_dir``; return the manifest.

    Layout: ``{split}/{source}-{shard:06d}.tar`` for split in train/val and source in pairs/docs,
    ``tokenizer/`` (a Hugging Face tokenizer folder) and ``world.json``, written last.
    """
    import webdataset as wds
    from tqdm.auto import tqdm

    from flamingo_lab.data.tokenizer import train_word_tokenizer

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old(out_dir)

    total = sum(cfg.count(sp, so) for sp in SPLITS for so in SOURCES)
    texts: list[str] = []
    shards: dict[str, dict[str, list[str]]] = {}
    counts: dict[str, dict[str, int]] = {}
    bar = tqdm(total=total, desc=f"world {cfg.name}", unit="sample", disable=not progress)
    for split in SPLITS:
        (out_dir / split).mkdir(exist_ok=True)
        shards[split], counts[split] = {}, {}
        n_images = 0
        for source in SOURCES:
            n = cfg.count(split, source)
            names = []
            for i, idx in enumerate(_shard_ranges(n, cfg.n_shards(split, source))):
                name = f"{split}/{source}-{i:06d}.tar"
                with wds.TarWriter(str(out_dir / name), encoder=False, mtime=MTIME) as w:
                    for index in idx:
                        sample = MAKERS[source](cfg, split, index)
                        texts.extend(sample_texts(sample))
                        n_images += sum(k.endswith(".png") or k == "png" for k in sample)
                        w.write(encode_sample(sample))
                        bar.update(1)
                names.append(name)
            shards[split][source] = names
            counts[split][source] = n
        counts[split]["images"] = n_images
    bar.close()

    tok = train_word_tokenizer(texts, out_dir / "tokenizer")
    manifest = {
        "format": WORLD_FORMAT,
        "name": cfg.name,
        "config": asdict(cfg),
        "counts": counts,
        "shards": shards,
        "tokenizer": "tokenizer",
        "vocab_size": len(tok),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)  # world.json appears only once everything else is written
    log.debug("wrote world %r to %s in %.1f s", cfg.name, out_dir, manifest["elapsed_s"])
    return manifest
