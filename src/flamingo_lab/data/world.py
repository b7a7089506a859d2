"""The embedded world: rendered scenes and short videos, the paper's four training sources, five
DEV-like evaluation tasks (plus an in-context one) and a text-only corpus with facts.

Everything is a pure function of ``WorldConfig.seed``: every sample draws from its own
``random.Random`` seeded by (seed, split, source, index), so adding a source or changing one
count leaves every other sample as it was, and the same seed writes byte-identical shards
(also when the shards are written by several processes).

Training sources (WebDataset shards, ``{split}/{source}-{shard:06d}.tar``):

- ``m3w``: interleaved pages (MMC4 layout: ``json`` with ``text_list`` and ``image_info``, images
  ``0.png`` ...). Page kinds: descriptions with cross-image sentences (counts, comparisons), quizzes
  and galleries written in the evaluation prompt formats (``Question: .. Answer: ..``,
  ``Output: ..``), colour-renaming games whose labels are given only by earlier images of the
  page, and pages that answer one kind of question (colour, shape or position) with the question left out
  (``Answer: ..``), so that only the page's earlier answers say what is asked. The prompt formats appear only here, never in the pairs (few-shot must not be zero-shot).
- ``ltip`` (clean, descriptive captions), ``align`` (noisier alt-text, more numerous) and
  ``laion`` (a share of vague or wrong captions): image-text pairs (``png``/``txt``/``json``).
- ``vtp``: video-text pairs (``0.png`` .. ``{F-1}.png`` frames, ``txt``, ``json``): an object
  moves, appears, disappears or changes colour. With ``vtp_clips`` N > 1, video pages instead: N clips in
  the MMC4 layout, each ``image_info`` entry naming its clip's frames (``frame_names``: ``c0f0.png`` ..).

Evaluation tasks (``tasks/{task}/{support|test}-{shard:06d}.tar``, format in ``make_task_sample``):
``coco`` (captioning), ``okvqa`` (needs a fact stated only in the text corpus), ``vqav2`` (ten
reference answers), ``msvdqa`` (video QA, top-1), ``vatex`` (video captioning) and
``renamed_colours`` (in-context: colour names are fresh words per episode, given only by the
support examples) and ``implicit_question`` (in-context: each episode asks one kind of question with the
question left out; only the support examples say which). Held-out colour-shape combinations never appear in training or support data;
a share of test items is built on them. Answers are balanced (no answer above 40% of a question type).

Text corpus (``corpus/{train,val}.txt``, one paragraph a line): scene descriptions and the facts
(colour -> fruit, shape -> thing), each fact stated hundreds of times, for LM pretraining.

``write_world(cfg, out_dir)`` writes shards, corpus, a word-level tokenizer and ``world.json``
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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image, ImageDraw

from flamingo_lab.data.tokenizer import EOC_TOKEN

log = logging.getLogger(__name__)

# /6: the tokenizer's ids are a pure function of the world's texts (corpus, shards and tasks; ties alphabetical); a
# world of another format is refused (load_world) and rewritten by flamingo-data
WORLD_FORMAT = "flamingo-lab-world/6"
#: Keys added to WorldConfig after worlds of this format were written, each with the value that writes the
#: same world as before it existed: a world.json without one reads as that value (load_world), and at that
#: value it is no part of a world's identity (pretrain.cache.world_fingerprint), so cached stages stay valid.
BACKWARD_DEFAULTS = {"game_bare": 0.0, "game_words": 0.0, "game_cues": 0.0, "vtp_moves": 0.25,
                     "position_words": "row_first", "vtp_clips": 1}
#: How a world is written, not what it holds: the shards' bytes do not depend on these (tests/test_world.py).
#: A world's identity takes each at this value, so a world written by 1 or 8 processes is the same world (its
#: stages and runs stay valid, flamingo-data does not rewrite it, the sweep accepts it).
WRITE_SETTINGS = {"workers": 2}
MANIFEST = "world.json"
SPLITS = ("train", "val")
SOURCES = ("m3w", "ltip", "align", "laion", "vtp")
TASK_SPLITS = ("support", "test")
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

#: Knowledge facts (OKVQA-like): stated only in the text corpus; m3w quiz pages ask knowledge questions
#: about their images (quiz_types) without stating the fact.
FRUITS = {"red": "cherry", "green": "lime", "blue": "blueberry", "yellow": "banana", "purple": "plum",
          "orange": "mango", "white": "coconut"}
THINGS = {"circle": "wheel", "square": "window", "triangle": "tent", "star": "starfish", "cross": "bandage"}

#: Fresh words for the in-context task: each episode names the colours anew.
NONSENSE = ("dax", "wug", "blicket", "fep", "toma", "zup", "kiki", "bouba", "lorp", "mib", "gazzer",
            "tufa", "pilk", "nerm", "sorn", "vab")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (50, 50, 50), "navy": (25, 30, 62), "brown": (62, 42, 28), "forest": (26, 52, 34),
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

SIZES: dict[str, float] = {"small": 0.6, "big": 0.9}  # object radius as a fraction of half a cell
# (small was 0.45: ~7 px across at 32 px, and the pretrained encoder named held-out small shapes 62% right)

CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # 2x2 grid, reading order
#: world.position_words: the words for the cells, in reading order (README, Position)
POSITION_WORDS = {"row_first": CELL_NAMES, "column_first": ("left top", "right top", "left bottom", "right bottom")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
#: cue words of the corpus's cued games (game_cues): words of every kind, so the LM binds on any token
CUE_WORDS = tuple(sorted(set(NONSENSE) | set(FRUITS.values()) | set(THINGS.values()) | set(SHAPES) | set(NUMBER_WORDS[1:11])))
#: video motions: direction -> (d_row, d_col) on the 2x2 grid
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
EVENTS = ("moves", "appears", "disappears", "turns")

#: The evaluation prompt formats (the paper's); they appear in training only inside m3w pages.
VQA_FORMAT = "Question: {question} Answer: {answer}"
CAPTION_FORMAT = "Output: {caption}"


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
    frames: int = 4  # frames per video clip (vtp, msvdqa, vatex)
    # training sources, per split
    n_train_m3w: int = 3000
    n_train_ltip: int = 3000
    n_train_align: int = 6000  # ALIGN: noisier and more numerous
    n_train_laion: int = 4000
    n_train_vtp: int = 1500
    n_val_m3w: int = 100
    n_val_ltip: int = 100
    n_val_align: int = 100
    n_val_laion: int = 100
    n_val_vtp: int = 100
    # evaluation tasks: items per split (renamed_colours: episodes x items per episode)
    n_support: int = 200
    n_test: int = 300
    n_episodes: int = 50
    episode_support: int = 10  # support items per episode (every colour twice with 5 colours)
    episode_test: int = 6
    held_out_share: float = 0.3  # share of test items whose target object is a held-out combination
    # text corpus (paragraphs)
    n_corpus_train: int = 30000  # the LM stage (3000 steps of 32 x 128 tokens) reads it about 5 times
    n_corpus_val: int = 200
    shard_size: int = 1000  # at most this many samples per shard ...
    min_shards: int = 4  # ... and at least this many shards per split and source (nodes x workers)
    workers: int = 2  # processes writing shards (1: in this process)
    min_objects: int = 1
    max_objects: int = 3
    min_images_per_doc: int = 2  # M3W pages hold a few images; the paper trains on up to 5
    max_images_per_doc: int = 5
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star"])
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple"])
    sizes: list[str] = field(default_factory=lambda: ["small", "big"])
    backgrounds: list[str] = field(default_factory=lambda: ["grey", "navy", "brown", "forest"])
    held_out: list[list[str]] = field(
        default_factory=lambda: [["red", "triangle"], ["green", "star"], ["blue", "circle"], ["yellow", "square"]]
    )
    background_jitter: int = 12  # +- per channel around the background colour; 0 gives plain ones
    align_noise: float = 0.4  # share of ALIGN captions that are partial, reordered or wrong
    laion_vague: float = 0.25  # share of LAION captions that say nothing about the image ...
    laion_wrong: float = 0.15  # ... and that name a wrong colour or shape
    vtp_qa: float = 0.25  # share of video-text pairs whose text is a question and its answer about the clip
    # share of video-text pairs whose clip shows a move (the rest: appears, disappears or turns, evenly);
    # 0.25 weighs the four events alike, as the msvdqa / vatex tasks do
    vtp_moves: float = 0.25
    # clips per video-text sample: 1 writes pairs (one clip, one text: the paper's VTP); N > 1 writes short video
    # pages of N clips, each with its own caption or question (MMC4 layout, a clip's frames per image entry), so
    # that a clip's question is also learned after other clips' texts, where a few-shot prompt asks it
    # (README, video direction). n_train_vtp / n_val_vtp count samples: N times as many clips.
    vtp_clips: int = 1
    # text corpus paragraph kinds -> weight: facts and descriptions; described scenes with questions
    # (knowledge questions too: the text form of okvqa); the colour-renaming game in words; clips with questions
    # The game dominates: the frozen LM must learn to bind each fresh word to its colour from context (the
    # in-context task is the LM's ability). 3-layer LM, 3000 steps, share of the right word copied (LM stage
    # report "game"; a guess among the words shown: 0.36): game share 0.5 -> 0.36, 0.7 -> 0.86
    corpus_kinds: dict[str, float] = field(
        default_factory=lambda: {"facts": 0.12, "qa": 0.1, "game": 0.7, "video_qa": 0.04, "implicit": 0.04}
    )
    # question types that m3w quiz and mixed pages ask (QUESTION_TYPES, KNOWLEDGE_TYPES): web pages ask about
    # what an image shows and about what one knows of it; the facts themselves are stated in the corpus only
    quiz_types: list[str] = field(default_factory=lambda: ["colour", "shape", "count", "position", "fruit", "thing"])
    # m3w page kinds -> weight
    page_kinds: dict[str, float] = field(
        default_factory=lambda: {"describe": 0.25, "quiz": 0.25, "gallery": 0.1, "game": 0.2, "mixed": 0.1,
                                 "implicit": 0.1}
    )
    # The renaming game with the colour as one bare word where an image would stand ("red Question: what colour
    # is it? Answer: dax"): game_bare is the share of the corpus's game items in that form, game_words the share
    # of m3w game items (after the page's first image) given so in place of an image. An LM that copies from
    # whole captions only does not bind a colour that no word names (README, in-context task); one trained on
    # the bare form binds on the one token where Flamingo's image stands, and word items beside images give
    # the cross-attention a path to it.
    game_bare: float = 0.0
    game_words: float = 0.0
    # share of the corpus's games cued by arbitrary words in place of the colours ("fep Question: what colour is
    # it? Answer: dax", each colour its own cue word for the whole game): the LM learns to bind on any token,
    # not only on a colour word (README, in-context task)
    game_cues: float = 0.0
    # The cells' words: "top left" (row_first) or "left top" (column_first). With the row first the baseline
    # learns the row late (the answer's first word); with the column first, both by step 400 (README, Position).
    position_words: str = "row_first"

    def cell_names(self) -> tuple[str, ...]:
        return POSITION_WORDS[self.position_words]

    def __post_init__(self):
        if self.position_words not in POSITION_WORDS:
            raise ValueError(f"world.position_words must be one of {sorted(POSITION_WORDS)}; got {self.position_words!r}")
        self.shapes, self.colours, self.sizes = list(self.shapes), list(self.colours), list(self.sizes)
        self.backgrounds = list(self.backgrounds)
        self.held_out = [list(p) for p in self.held_out]
        self.page_kinds = dict(self.page_kinds)
        self.corpus_kinds = dict(self.corpus_kinds)
        self.quiz_types = list(self.quiz_types)
        bad = [q for q in self.quiz_types if q not in QUESTION_TYPES + KNOWLEDGE_TYPES]
        if bad or not self.quiz_types:
            raise ValueError(f"world.quiz_types must be a non-empty list of {list(QUESTION_TYPES + KNOWLEDGE_TYPES)}; "
                             f"got {self.quiz_types}")
        for what, chosen, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [c for c in chosen if c not in known]
            if unknown or not chosen:
                raise ValueError(
                    f"world.{what} must be a non-empty subset of {sorted(known)}; got {chosen} "
                    f"(unknown: {unknown})"
                )
        if len(self.colours) < 3 or len(self.shapes) < 3:
            raise ValueError(f"world needs >= 3 colours and >= 3 shapes (balanced answers <= 40%); got "
                             f"{self.colours}, {self.shapes}")
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in self.colours or pair[1] not in self.shapes:
                raise ValueError(f"world.held_out entries must be [colour, shape] from world.colours/shapes; got {pair}")
        for c in self.colours:
            if all([c, s] in self.held_out for s in self.shapes):
                raise ValueError(f"world.held_out holds out every shape of colour {c!r}: keep at least one")
        if len(self.colours) > len(NONSENSE):
            raise ValueError(f"renamed_colours needs len(colours) <= {len(NONSENSE)} fresh words")
        if self.image_size < 8:
            raise ValueError(f"world.image_size must be >= 8 pixels; got {self.image_size}")
        if self.supersample < 1:
            raise ValueError(f"world.supersample must be >= 1 (1 draws at image_size); got {self.supersample}")
        if not 1 <= self.vtp_clips <= len(ORDINALS):
            raise ValueError(f"world.vtp_clips must be in [1, {len(ORDINALS)}] (1: video-text pairs); got {self.vtp_clips}")
        if not 2 <= self.frames <= 8:
            raise ValueError(f"world.frames must be in [2, 8] (resampler.max_frames is 8); got {self.frames}")
        for k, v in asdict(self).items():
            if k.startswith("n_") and v < 0:
                raise ValueError(f"world.{k} must be >= 0; got {v}")
        if self.shard_size < 1 or self.min_shards < 1 or self.workers < 1:
            raise ValueError(
                f"world.shard_size, world.min_shards and world.workers must be >= 1; got "
                f"{self.shard_size}, {self.min_shards}, {self.workers}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 4 or self.max_objects < 3:
            raise ValueError(
                "world needs 1 <= min_objects <= max_objects <= 4 and max_objects >= 3 (one object per cell "
                "of the 2x2 grid; counting answers balanced <= 40%); "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 1 <= self.min_images_per_doc <= self.max_images_per_doc <= len(ORDINALS):
            raise ValueError(
                f"world needs 1 <= min_images_per_doc <= max_images_per_doc <= {len(ORDINALS)}; got "
                f"{self.min_images_per_doc}, {self.max_images_per_doc} (the paper uses up to 5)"
            )
        if not 0 <= self.background_jitter <= 40:
            raise ValueError(f"world.background_jitter must be in [0, 40]; got {self.background_jitter}")
        unknown = sorted(set(self.page_kinds) - set(PAGE_KINDS))
        if unknown or not any(w > 0 for w in self.page_kinds.values()):
            raise ValueError(f"world.page_kinds must weight some of {sorted(PAGE_KINDS)}; unknown {unknown}")
        unknown = sorted(set(self.corpus_kinds) - set(CORPUS_KINDS))
        if unknown or not any(w > 0 for w in self.corpus_kinds.values()):
            raise ValueError(f"world.corpus_kinds must weight some of {sorted(CORPUS_KINDS)}; unknown {unknown}")
        for k in ("held_out_share", "align_noise", "laion_vague", "laion_wrong", "vtp_qa", "vtp_moves", "game_bare",
                  "game_words", "game_cues"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"world.{k} must be in [0, 1]; got {getattr(self, k)}")

    def count(self, split: str, source: str) -> int:
        return getattr(self, f"n_{split}_{source}")

    def n_shards(self, n: int) -> int:
        if n == 0:
            return 0
        return min(n, max(self.min_shards, math.ceil(n / self.shard_size)))

    def is_held_out(self, colour: str, shape: str) -> bool:
        return [colour, shape] in self.held_out


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
    background_name: str = "grey"
    cell_names: tuple[str, ...] = CELL_NAMES  # the world's words for the cells (world.position_words)

    def meta(self) -> dict:
        """Ground truth per object (colour, shape, size, cell) for analysis and encoder pretraining."""
        out = {
            "objects": [{**asdict(o), "position": self.cell_names[o.cell]} for o in self.objects],
            "n_objects": len(self.objects),
            "background": list(self.background),
            "background_name": self.background_name,
        }
        if tuple(self.cell_names) != CELL_NAMES:  # (a world of the default words writes what it wrote before)
            out["cell_names"] = list(self.cell_names)
        return out


def _attrs(rng: random.Random, cfg: WorldConfig, held: bool, *, colour=None, shape=None,
           not_colours=(), not_shapes=()) -> tuple[str, str]:
    """A (colour, shape): a held-out combination if ``held``, else one seen in training."""
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes
             if cfg.is_held_out(c, s) == held and (colour is None or c == colour)
             and (shape is None or s == shape) and c not in not_colours and s not in not_shapes]
    if not pairs:  # e.g. a colour without a held-out shape: fall back to a seen combination
        return _attrs(rng, cfg, False, colour=colour, shape=shape, not_colours=not_colours, not_shapes=not_shapes)
    return rng.choice(pairs)


def sample_scene(rng: random.Random, cfg: WorldConfig, *, n: int | None = None, target: dict | None = None,
                 held: bool = False, distinct: str | None = None) -> Scene:
    """A scene of ``n`` objects (random if None). ``target`` fixes attributes of the first object
    (colour, shape, size, cell); ``held`` makes it a held-out combination; ``distinct`` ('shape',
    'colour' or 'both') keeps the other objects from sharing that attribute with it. Other objects
    are never held-out combinations."""
    n = rng.randint(cfg.min_objects, cfg.max_objects) if n is None else n
    target = dict(target or {})
    cells = rng.sample(range(4), n)
    if "cell" in target and target["cell"] in cells:
        cells.remove(target["cell"])
        cells.insert(0, target["cell"])
    elif "cell" in target:
        cells[0] = target["cell"]
    c, s = _attrs(rng, cfg, held, colour=target.get("colour"), shape=target.get("shape"))
    objects = [Obj(s, c, target.get("size") or rng.choice(cfg.sizes), cells[0])]
    for cell in cells[1:]:
        nc = (c,) if distinct in ("colour", "both") else ()
        ns = (s,) if distinct in ("shape", "both") else ()
        oc, os_ = _attrs(rng, cfg, False, not_colours=nc, not_shapes=ns)
        if distinct is None:
            while (oc, os_) == (c, s):  # never two objects that look the same
                oc, os_ = _attrs(rng, cfg, False)
        objects.append(Obj(os_, oc, rng.choice(cfg.sizes), cell))
    bg_name = rng.choice(cfg.backgrounds)
    j = cfg.background_jitter
    background = tuple(max(0, v + rng.randint(-j, j)) for v in BACKGROUNDS[bg_name])
    jitter = [(0.0, 0.0) if o.size == "big" else (rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)) for o in objects]
    order = sorted(range(n), key=lambda i: objects[i].cell)  # reading order, as descriptions name them
    return Scene([objects[i] for i in order], background, [jitter[i] for i in order], bg_name, cfg.cell_names())


def _cell_centre(cell: int, jx: float = 0.0, jy: float = 0.0) -> tuple[float, float]:
    row, col = divmod(cell, 2)
    return (2 * col + 1) / 4 + jx / 2, (2 * row + 1) / 4 + jy / 2  # fractions of the image


def render(items: list[tuple[str, str, str, float, float]], background, cfg: WorldConfig) -> Image.Image:
    """Draw ``(shape, colour, size, x, y)`` items (x, y: centre as fractions of the image)."""
    big = cfg.image_size * cfg.supersample
    img = Image.new("RGB", (big, big), tuple(background))
    d = ImageDraw.Draw(img)
    half = big / 4  # half a cell
    for shape, colour, size, x, y in items:
        SHAPES[shape](d, x * big, y * big, SIZES[size] * half, COLOURS[colour])
    if cfg.supersample > 1:
        img = img.resize((cfg.image_size, cfg.image_size), Image.BOX)
    return img


def render_scene(scene: Scene, cfg: WorldConfig) -> Image.Image:
    items = [(o.shape, o.colour, o.size, *_cell_centre(o.cell, jx, jy)) for o, (jx, jy) in zip(scene.objects, scene.jitter)]
    return render(items, scene.background, cfg)


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
        return f"{objs[0].phrase()} in the {scene.cell_names[objs[0].cell]}"
    if len(objs) == 2:
        return f"{objs[0].phrase()} {_relation(objs[0], objs[1])} {objs[1].phrase()}"
    parts = [f"{o.phrase()} in the {scene.cell_names[o.cell]}" for o in objs]
    return f"{NUMBER_WORDS[len(objs)]} shapes: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    return describe(scene) + "."


def scene_text(meta: Mapping[str, Any]) -> str:
    """The words for an image or clip from its ``scene`` metadata (``Scene.meta()`` / ``Clip.meta()``):
    the caption the corpus uses for a still, the first caption variant for a clip. The evaluation's
    text-description control puts this in place of the image."""
    try:
        objects = [Obj(o["shape"], o["colour"], o["size"], int(o["cell"])) for o in meta["objects"]]
    except (KeyError, TypeError) as exn:
        raise ValueError(f"scene metadata without objects (shape, colour, size, cell): {meta!r}") from exn
    scene = Scene(objects, tuple(meta.get("background", (0, 0, 0))), [(0.0, 0.0)] * len(objects),
                  cell_names=tuple(meta.get("cell_names") or CELL_NAMES))
    if "event" in meta:
        return clip_caption(Clip(scene, int(meta["actor"]), meta["event"], meta["detail"]))
    return caption(scene)


def caption_variants(rng: random.Random, scene: Scene, k: int = 5) -> list[str]:
    """``k`` reference captions (COCO has five per image): the description, and the objects named
    in other orders and words."""
    objs = scene.objects
    out = [caption(scene)]
    templates = ("there is {}.", "a picture of {}.", "{} on a dark background.", "an image with {}.",
                 "we can see {}.", "this shows {}.")
    while len(out) < k:
        order = rng.sample(objs, len(objs))
        names = [f"a {o.colour} {o.shape}" if rng.random() < 0.5 else o.phrase() for o in order]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        out.append(rng.choice(templates).format(listed))
    return out


# ---------------------------------------------------------------------------------------------
# Questions (balanced: the answer is drawn first, the scene is built around it)
# ---------------------------------------------------------------------------------------------

QUESTION_TYPES = ("colour", "shape", "count", "position")
KNOWLEDGE_TYPES = ("fruit", "thing")


def make_question(rng: random.Random, cfg: WorldConfig, qtype: str, held: bool) -> tuple[Scene, str, str]:
    """(scene, question, answer) of a VQA question type; the answer is drawn uniformly first."""
    if qtype == "colour":
        colour = rng.choice(cfg.colours)
        scene = sample_scene(rng, cfg, target={"colour": colour}, held=held, distinct="shape")
        return scene, f"what colour is the {_first(scene, colour=colour).shape}?", colour
    if qtype == "shape":
        shape = rng.choice(cfg.shapes)
        scene = sample_scene(rng, cfg, target={"shape": shape}, held=held, distinct="colour")
        return scene, f"what shape is the {_first(scene, shape=shape).colour} object?", shape
    if qtype == "count":
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        scene = sample_scene(rng, cfg, n=n, held=held)
        return scene, "how many shapes are there?", NUMBER_WORDS[n]
    if qtype == "position":
        cell = rng.randrange(4)
        scene = sample_scene(rng, cfg, target={"cell": cell}, held=held)
        o = next(o for o in scene.objects if o.cell == cell)
        return scene, f"where is the {o.colour} {o.shape}?", scene.cell_names[cell]
    if qtype == "fruit":  # OKVQA-like: the colour must be seen, the fruit recalled from text
        colour = rng.choice(cfg.colours)
        scene = sample_scene(rng, cfg, target={"colour": colour}, held=held, distinct="shape")
        return scene, f"which fruit has the colour of the {_first(scene, colour=colour).shape}?", FRUITS[colour]
    if qtype == "thing":
        shape = rng.choice(cfg.shapes)
        scene = sample_scene(rng, cfg, target={"shape": shape}, held=held, distinct="colour")
        return scene, f"what thing has the shape of the {_first(scene, shape=shape).colour} object?", THINGS[shape]
    raise ValueError(f"unknown question type {qtype!r}; valid: {QUESTION_TYPES + KNOWLEDGE_TYPES}")


#: The in-context task with the question left implicit (issue: "answer format given only by the support
#: examples ... or a question left implicit"): a page, a corpus paragraph or an episode asks one of these about
#: single-object scenes, as "Answer: <answer>" with no question, so only its earlier answers say which.
IMPLICIT_TYPES = ("colour", "shape", "position")
IMPLICIT_FORMAT = "Answer: {answer}"


def implicit_scene(rng: random.Random, cfg: WorldConfig, qtype: str, answer: str, held: bool = False) -> Scene:
    """A single-object scene whose ``qtype`` (colour, shape or position) is ``answer``."""
    if qtype == "colour":
        return sample_scene(rng, cfg, n=1, target={"colour": answer}, held=held)
    if qtype == "shape":
        return sample_scene(rng, cfg, n=1, target={"shape": answer}, held=held)
    if qtype == "position":
        return sample_scene(rng, cfg, n=1, target={"cell": cfg.cell_names().index(answer)}, held=held)
    raise ValueError(f"unknown implicit question type {qtype!r}; valid: {IMPLICIT_TYPES}")


def implicit_answer(scene: Scene, qtype: str) -> str:
    o = scene.objects[0]
    return {"colour": o.colour, "shape": o.shape, "position": scene.cell_names[o.cell]}[qtype]


def _first(scene: Scene, **attrs) -> Obj:
    return next(o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items()))


def _alternatives(cfg: WorldConfig, qtype: str) -> list[str]:
    return {
        "colour": cfg.colours, "shape": cfg.shapes, "position": list(cfg.cell_names()),
        "count": list(NUMBER_WORDS[cfg.min_objects: cfg.max_objects + 1]),
        "fruit": [FRUITS[c] for c in cfg.colours], "thing": [THINGS[s] for s in cfg.shapes],
    }[qtype]


def ten_answers(rng: random.Random, cfg: WorldConfig, qtype: str, answer: str) -> list[str]:
    """Ten human-like answers (VQAv2): the right one first and in the majority, a few others."""
    others = [a for a in _alternatives(cfg, qtype) if a != answer]
    n_wrong = rng.choice((0, 0, 0, 1, 1, 2, 3))
    return [answer] * (10 - n_wrong) + [rng.choice(others) for _ in range(n_wrong)]


# ---------------------------------------------------------------------------------------------
# Videos: one object moves, appears, disappears or changes colour
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    scene: Scene  # the first frame's objects; the actor is scene.objects[actor]
    actor: int
    event: str
    detail: str  # direction (moves), new colour (turns), cell name (appears/disappears)

    def meta(self) -> dict:
        return {**self.scene.meta(), "actor": self.actor, "event": self.event, "detail": self.detail}


def sample_clip(rng: random.Random, cfg: WorldConfig, *, held: bool = False, event: str | None = None) -> Clip:
    event = event or rng.choice(EVENTS)
    n = rng.randint(1, 2)
    if event == "moves":
        direction = rng.choice(list(MOVES))
        dr, dc = MOVES[direction]
        starts = [c for c in range(4) if 0 <= c // 2 + dr <= 1 and 0 <= c % 2 + dc <= 1]
        start = rng.choice(starts)
        end = (start // 2 + dr) * 2 + start % 2 + dc
        scene = sample_scene(rng, cfg, n=n, target={"cell": start}, held=held, distinct="both")
        if any(o.cell == end for o in scene.objects):  # the way must be free
            scene.objects = [o for o in scene.objects if o.cell != end]
            scene.jitter = scene.jitter[: len(scene.objects)]
        detail = direction
    else:
        scene = sample_scene(rng, cfg, n=n, held=held, distinct="both")
        detail = ""
    actor = next(i for i, o in enumerate(scene.objects) if cfg.is_held_out(o.colour, o.shape) == held) if held else 0
    if event == "moves":
        actor = next(i for i, o in enumerate(scene.objects) if o.cell == start)
    if event == "turns":
        o = scene.objects[actor]
        detail = rng.choice([c for c in cfg.colours if c != o.colour and not cfg.is_held_out(c, o.shape)] or
                            [c for c in cfg.colours if c != o.colour])
    if event in ("appears", "disappears"):
        detail = scene.cell_names[scene.objects[actor].cell]
    scene.jitter = [(0.0, 0.0)] * len(scene.objects)
    return Clip(scene, actor, event, detail)


def render_clip(clip: Clip, cfg: WorldConfig) -> list[Image.Image]:
    frames = []
    F = cfg.frames
    for f in range(F):
        t = f / (F - 1)
        items = []
        for i, o in enumerate(clip.scene.objects):
            x, y = _cell_centre(o.cell)
            colour = o.colour
            if i == clip.actor:
                if clip.event == "moves":
                    dr, dc = MOVES[clip.detail]
                    x, y = x + t * dc / 2, y + t * dr / 2
                elif clip.event == "appears" and f < F // 2:
                    continue
                elif clip.event == "disappears" and f >= F // 2:
                    continue
                elif clip.event == "turns" and f >= F // 2:
                    colour = clip.detail
            items.append((o.shape, colour, o.size, x, y))
        frames.append(render(items, clip.scene.background, cfg))
    return frames


def clip_caption(clip: Clip, variant: int = 0) -> str:
    o = clip.scene.objects[clip.actor]
    name = o.phrase() if variant % 2 == 0 else f"the {o.colour} {o.shape}"
    if clip.event == "moves":
        return [f"{name} moves {clip.detail}.", f"{name} moves to the {clip.detail}." if clip.detail in ("left", "right")
                else f"{name} goes {clip.detail}."][variant // 2 % 2]
    if clip.event == "appears":
        return [f"{name} appears in the {clip.detail}.", f"{name} appears."][variant // 2 % 2]
    if clip.event == "disappears":
        return [f"{name} disappears from the {clip.detail}.", f"{name} disappears."][variant // 2 % 2]
    return [f"{name} turns {clip.detail}.", f"{name} changes to {clip.detail}."][variant // 2 % 2]


def clip_question(rng: random.Random, clip: Clip) -> tuple[str, str, str]:
    """(question type, question, answer) about the clip's event (MSVDQA-like: one-word answers)."""
    o = clip.scene.objects[clip.actor]
    if clip.event == "moves":
        return "direction", f"which way does the {o.colour} {o.shape} move?", clip.detail
    if clip.event == "appears":
        if rng.random() < 0.5:
            return "shape", "what shape appears?", o.shape
        return "colour", "what colour is the shape that appears?", o.colour
    if clip.event == "disappears":
        return "shape", "what shape disappears?", o.shape
    return "colour", f"what colour does the {o.shape} turn?", clip.detail


# ---------------------------------------------------------------------------------------------
# Interleaved documents (MMC4 layout: sentences, and images matched to the sentence after them)
# ---------------------------------------------------------------------------------------------

_INTROS = ("look at these pictures.", "a page about shapes.", "here are some pictures of shapes.")
_LEADS = ("here is {}.", "this picture shows {}.", "next, {}.", "we see {}.")
_QUIZ_INTROS = ("a quiz about shapes.", "answer the questions about each picture.", "questions and answers.")
_GALLERY_INTROS = ("a gallery of pictures with captions.", "pictures and what they show.")
_GAME_INTROS = ("in this game the colours have new names.", "a game: learn the new colour words.")


def make_doc(rng: random.Random, scenes: list[Scene]) -> tuple[list[str], list[int]]:
    """Return ``(text_list, matched_text_index per image)`` for a descriptive page showing ``scenes``.

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


def _page(rng: random.Random, cfg: WorldConfig, kind: str, n_img: int) -> tuple[list[str], list[int], list[Scene], dict]:
    """One m3w page of ``kind``: (text_list, matched indices, scenes, extra metadata)."""
    if kind == "describe":
        scenes = [sample_scene(rng, cfg) for _ in range(n_img)]
        text, matched = make_doc(rng, scenes)
        return text, matched, scenes, {}
    text: list[str] = []
    intros = {"quiz": _QUIZ_INTROS, "gallery": _GALLERY_INTROS, "game": _GAME_INTROS, "mixed": _INTROS,
              "implicit": _INTROS}[kind]
    if rng.random() < 0.4:
        text.append(rng.choice(intros))
    matched, scenes, extra = [], [], {}
    if kind == "game":  # labels given only by earlier images of this page
        names = rng.sample(NONSENSE, len(cfg.colours))
        mapping = dict(zip(cfg.colours, names))
        palette = rng.sample(cfg.colours, min(len(cfg.colours), rng.randint(2, 3)))
        extra = {"mapping": mapping}
    qtype = rng.choice(cfg.quiz_types)  # a quiz page asks one kind of question, as a worksheet does
    implicit_type = rng.choice(IMPLICIT_TYPES) if kind == "implicit" else None  # no draw for older page kinds
    for _ in range(n_img):
        matched.append(len(text))
        if kind == "gallery" or (kind == "mixed" and rng.random() < 0.5):
            s = sample_scene(rng, cfg)
            text.append(CAPTION_FORMAT.format(caption=caption(s)))
        elif kind == "game":
            s = sample_scene(rng, cfg, n=1, target={"colour": rng.choice(palette)})
            item = VQA_FORMAT.format(question="what colour is it?", answer=mapping[s.objects[0].colour])
            if scenes and cfg.game_words > 0 and rng.random() < cfg.game_words:  # in words: no image
                matched.pop()
                text.append(f"{s.objects[0].colour} {item}")
                continue
            text.append(item)
        elif kind == "implicit":  # the question left implicit: the page's answers are all of one kind
            s = implicit_scene(rng, cfg, implicit_type, rng.choice(_alternatives(cfg, implicit_type)))
            text.append(IMPLICIT_FORMAT.format(answer=implicit_answer(s, implicit_type)))
        else:
            s, q, a = make_question(rng, cfg, qtype if kind == "quiz" else rng.choice(cfg.quiz_types), False)
            text.append(VQA_FORMAT.format(question=q, answer=a))
        scenes.append(s)
        if kind == "mixed" and rng.random() < 0.5:
            text.append(rng.choice(_LEADS).format(describe(s)))
    return text, matched, scenes, extra


PAGE_KINDS = ("describe", "quiz", "gallery", "game", "mixed", "implicit")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def _rng(cfg: WorldConfig, split: str, source: str, index: int) -> random.Random:
    return random.Random(f"{cfg.seed}/{split}/{source}/{index}")  # str seeds hash with sha512: stable


def make_doc_sample(cfg: WorldConfig, split: str, index: int) -> dict:
    rng = _rng(cfg, split, "m3w", index)
    kinds = [k for k in PAGE_KINDS if cfg.page_kinds.get(k, 0) > 0]
    kind = rng.choices(kinds, weights=[cfg.page_kinds[k] for k in kinds])[0]
    n_img = rng.randint(cfg.min_images_per_doc, cfg.max_images_per_doc)
    text_list, matched, scenes, extra = _page(rng, cfg, kind, n_img)
    sample = {"__key__": f"{split}-m3w-{index:07d}"}
    image_info = []
    for i, (s, m) in enumerate(zip(scenes, matched)):
        sample[f"{i}.png"] = png_bytes(render_scene(s, cfg))
        image_info.append({"matched_text_index": m, "image_name": f"{i}.png", "scene": s.meta()})
    sample["json"] = {"text_list": text_list, "image_info": image_info, "split": split, "index": index,
                      "page_kind": kind, **extra}
    return sample


def _noisy_caption(rng: random.Random, cfg: WorldConfig, scene: Scene, source: str) -> tuple[str, str]:
    """(caption, noise kind) for a pair source: ltip clean, align alt-text-like, laion vague or wrong."""
    clean = caption(scene)
    o = rng.choice(scene.objects)
    wrong = f"a {o.size} {rng.choice([c for c in cfg.colours if c != o.colour])} {o.shape}."
    if source == "ltip":
        return (clean if rng.random() < 0.7 else f"a picture of {clean}"), "clean"
    if source == "align":
        if rng.random() >= cfg.align_noise:
            return clean, "clean"
        r = rng.random()
        if r < 0.5:
            return f"{o.colour} {o.shape}", "partial"  # alt-text names one object, tersely
        if r < 0.8:
            words = [o.shape, o.colour, o.size, "shapes"]
            rng.shuffle(words)
            return " ".join(words), "bag of words"
        return wrong, "wrong"
    if source == "laion":
        r = rng.random()
        if r < cfg.laion_vague:
            return rng.choice(("a picture.", "shapes.", "nice picture of shapes.", "an image.", "some art.")), "vague"
        if r < cfg.laion_vague + cfg.laion_wrong:
            return wrong, "wrong"
        return clean, "clean"
    raise ValueError(f"no caption style for source {source!r}")


def make_pair(cfg: WorldConfig, split: str, index: int, source: str = "ltip") -> dict:
    rng = _rng(cfg, split, source, index)
    scene = sample_scene(rng, cfg)
    cap, noise = _noisy_caption(rng, cfg, scene, source)
    return {
        "__key__": f"{split}-{source}-{index:07d}",
        "png": png_bytes(render_scene(scene, cfg)),
        "txt": cap,
        "json": {"scene": scene.meta(), "caption_noise": noise, "split": split, "index": index},
    }


def _video_clip_and_text(rng: random.Random, cfg: WorldConfig) -> tuple[Clip, str, str]:
    """One clip and its text (a caption, or a question and its answer), and the text's kind."""
    if cfg.vtp_moves == BACKWARD_DEFAULTS["vtp_moves"]:
        clip = sample_clip(rng, cfg)  # the four events alike, drawn as before vtp_moves existed (same shards)
    else:
        event = "moves" if rng.random() < cfg.vtp_moves else rng.choice([e for e in EVENTS if e != "moves"])
        clip = sample_clip(rng, cfg, event=event)
    variant = rng.randrange(4)
    if rng.random() < cfg.vtp_qa:  # a clip with a question and its answer (a web video's Q&A text)
        _, q, a = clip_question(rng, clip)
        return clip, VQA_FORMAT.format(question=q, answer=a), "qa"
    return clip, clip_caption(clip, variant), "caption"


def make_video_pair(cfg: WorldConfig, split: str, index: int) -> dict:
    """A video-text pair (frames ``0.png`` .., ``txt``), or with ``vtp_clips`` > 1 a video page: per clip ``c``
    its frames ``c{c}f{f}.png`` named by an ``image_info`` entry's ``frame_names`` before its text."""
    rng = _rng(cfg, split, "vtp", index)
    sample = {"__key__": f"{split}-vtp-{index:07d}"}
    if cfg.vtp_clips == 1:
        clip, text, kind = _video_clip_and_text(rng, cfg)
        for f, img in enumerate(render_clip(clip, cfg)):
            sample[f"{f}.png"] = png_bytes(img)
        sample["txt"] = text
        sample["json"] = {"scene": clip.meta(), "frames": cfg.frames, "split": split, "index": index,
                          "text_kind": kind}
        return sample
    text_list, image_info = [], []
    for c in range(cfg.vtp_clips):
        clip, text, kind = _video_clip_and_text(rng, cfg)
        names = [f"c{c}f{f}.png" for f in range(cfg.frames)]
        for name, img in zip(names, render_clip(clip, cfg)):
            sample[name] = png_bytes(img)
        image_info.append({"matched_text_index": c, "frame_names": names, "scene": clip.meta(), "text_kind": kind})
        text_list.append(text)
    sample["json"] = {"text_list": text_list, "image_info": image_info, "frames": cfg.frames, "split": split,
                      "index": index}
    return sample


def _source_maker(source: str) -> Callable[[WorldConfig, str, int], dict]:
    if source == "m3w":
        return make_doc_sample
    if source == "vtp":
        return make_video_pair
    return lambda cfg, split, index: make_pair(cfg, split, index, source)


# ---------------------------------------------------------------------------------------------
# Evaluation tasks
# ---------------------------------------------------------------------------------------------

#: task -> (kind, metric, frames per item (0: world.frames), in_context)
TASKS: dict[str, tuple[str, str, int, bool]] = {
    "coco": ("caption", "cider", 1, False),
    "okvqa": ("vqa", "vqa_accuracy", 1, False),
    "vqav2": ("vqa", "vqa_accuracy", 1, False),
    "msvdqa": ("video_qa", "top1", 0, False),
    "vatex": ("video_caption", "cider", 0, False),
    "renamed_colours": ("vqa", "top1", 1, True),
    "implicit_question": ("vqa", "top1", 1, True),
}
#: Tasks whose 0-shot prompt is the query alone: their support examples' text would say what the shots are
#: there to say (implicit_question: "Answer: red" names the kind of answer wanted), so the paper's two
#: text-only examples would make 0 shots a k-shot prompt without images.
QUERY_ONLY_ZERO_SHOT = ("implicit_question",)


def list_tasks() -> list[str]:
    return list(TASKS)


def task_count(cfg: WorldConfig, task: str, split: str) -> int:
    if TASKS[task][3]:
        return cfg.n_episodes * (cfg.episode_support if split == "support" else cfg.episode_test)
    return cfg.n_support if split == "support" else cfg.n_test


def make_task_sample(cfg: WorldConfig, task: str, split: str, index: int) -> dict:
    """One evaluation item: ``0.png`` .. ``{F-1}.png`` and ``json`` = {id, question, answers,
    captions, episode, scene, qtype, held_out}. Support items never use held-out combinations."""
    rng = _rng(cfg, split, task, index)
    held = split == "test" and rng.random() < cfg.held_out_share
    meta = {"id": f"{task}-{split}-{index:07d}", "question": None, "answers": [], "captions": [], "episode": None}
    images: list[Image.Image]
    if task == "coco":
        scene = sample_scene(rng, cfg, held=held)
        images, meta["captions"], meta["scene"] = [render_scene(scene, cfg)], caption_variants(rng, scene), scene.meta()
        meta["qtype"] = "caption"
    elif task in ("vqav2", "okvqa"):
        qtype = rng.choice(QUESTION_TYPES if task == "vqav2" else KNOWLEDGE_TYPES)
        scene, q, a = make_question(rng, cfg, qtype, held)
        images, meta["scene"] = [render_scene(scene, cfg)], scene.meta()
        meta.update(question=q, answers=ten_answers(rng, cfg, qtype, a), qtype=qtype)
    elif task in ("msvdqa", "vatex"):
        clip = sample_clip(rng, cfg, held=held)
        images, meta["scene"] = render_clip(clip, cfg), clip.meta()
        if task == "msvdqa":
            qtype, q, a = clip_question(rng, clip)
            meta.update(question=q, answers=[a], qtype=qtype)
        else:
            meta.update(captions=[clip_caption(clip, v) for v in range(4)], qtype=clip.event)
    elif task == "renamed_colours":
        per = cfg.episode_support if split == "support" else cfg.episode_test
        episode = index // per
        names = random.Random(f"{cfg.seed}/episode/{episode}").sample(NONSENSE, len(cfg.colours))
        mapping = dict(zip(cfg.colours, names))
        if split == "support":  # every colour shown in each episode's support set
            colour = cfg.colours[(index % per) % len(cfg.colours)]
        else:
            colour = rng.choice(cfg.colours)
        scene = sample_scene(rng, cfg, n=1, target={"colour": colour}, held=held)
        images, meta["scene"] = [render_scene(scene, cfg)], scene.meta()
        meta.update(question="what colour is it?", answers=[mapping[colour]], episode=episode, qtype="colour",
                    mapping=mapping)
    elif task == "implicit_question":
        per = cfg.episode_support if split == "support" else cfg.episode_test
        episode = index // per
        qtype = IMPLICIT_TYPES[episode % len(IMPLICIT_TYPES)]  # each kind in a third of the episodes
        values = _alternatives(cfg, qtype)
        # support: every answer of the kind in turn (each shown in an episode of 10); test: drawn uniformly
        answer = values[(index % per) % len(values)] if split == "support" else rng.choice(values)
        scene = implicit_scene(rng, cfg, qtype, answer, held)
        images, meta["scene"] = [render_scene(scene, cfg)], scene.meta()
        meta.update(question=None, answers=[answer], episode=episode, qtype=qtype)
    else:
        raise ValueError(f"unknown task {task!r}; valid: {list_tasks()}")
    # `held` as drawn: where the asked colour has no held-out pair (_attrs falls back) the scene shows none; the
    # evaluation reads the label from the scene (eval.tasks._relabel_held_out); written as before, same bytes
    meta["held_out"] = held
    sample = {"__key__": meta["id"]}
    for f, img in enumerate(images):
        sample[f"{f}.png"] = png_bytes(img)
    sample["json"] = meta
    return sample


# ---------------------------------------------------------------------------------------------
# Text corpus: descriptions and facts, for the LM pretraining stage
# ---------------------------------------------------------------------------------------------

_FRUIT_FACTS = ("the {fruit} is {colour}.", "a {fruit} has the colour {colour}.",
                "which fruit is {colour}? the {fruit}.", "the fruit with the colour {colour} is the {fruit}.",
                "Question: which fruit is {colour}? Answer: {fruit}", "{colour} like a {fruit}.")
_THING_FACTS = ("a {thing} has the shape of a {shape}.", "the {thing} looks like a {shape}.",
                "which thing has the shape of a {shape}? the {thing}.", "a {shape} like a {thing}.",
                "Question: what thing has the shape of a {shape}? Answer: {thing}")


CORPUS_KINDS = ("facts", "qa", "game", "video_qa", "implicit")


def corpus_paragraph(cfg: WorldConfig, split: str, index: int) -> str:
    """A paragraph of one of ``cfg.corpus_kinds``: scene descriptions and event sentences with a fact
    every other sentence or so (facts); described scenes each followed by a question and its answer,
    knowledge questions included (qa: what an image's text says, in words); the colour-renaming game
    with the colours named in words (game); clip descriptions with questions (video_qa). The question
    formats are the evaluation prompts' (``VQA_FORMAT``); no scene here is a held-out combination."""
    rng = _rng(cfg, split, "corpus", index)
    kinds = [k for k in CORPUS_KINDS if cfg.corpus_kinds.get(k, 0) > 0]
    kind = rng.choices(kinds, weights=[cfg.corpus_kinds[k] for k in kinds])[0]
    # Half the question paragraphs end each item with <|endofchunk|>, as Flamingo's pages and prompts do: an LM
    # that never saw it plays the game in words (copy 0.61 when the colour was shown) but not once the
    # evaluation's separator stands between the items (0.17), and Flamingo's 400 steps do not repair that.
    sep = EOC_TOKEN if kind != "facts" and rng.random() < 0.5 else " "
    if kind == "qa":
        items = []
        for _ in range(rng.randint(2, 4)):
            s, q, a = make_question(rng, cfg, rng.choice(QUESTION_TYPES + KNOWLEDGE_TYPES), False)
            items.append(f"{caption(s)} {VQA_FORMAT.format(question=q, answer=a)}")
        return sep.join(items)
    if kind == "game":
        # long games over up to every colour: most answers can be copied from an earlier item, and only by
        # matching its colour (a guess among the words shown is right a third of the time)
        mapping = dict(zip(cfg.colours, rng.sample(NONSENSE, len(cfg.colours))))
        palette = rng.sample(cfg.colours, rng.randint(2, len(cfg.colours)))
        intro = rng.choice(_GAME_INTROS) + " " if rng.random() < 0.4 else ""
        cues = None
        if cfg.game_cues > 0 and rng.random() < cfg.game_cues:  # no draw at 0: older corpora stay the same
            pool = sorted(set(CUE_WORDS) - set(mapping.values()))
            cues = dict(zip(cfg.colours, rng.sample(pool, len(cfg.colours))))
        items = []
        for _ in range(rng.randint(4, 9)):
            s = sample_scene(rng, cfg, n=1, target={"colour": rng.choice(palette)})
            answer = mapping[s.objects[0].colour]
            if cues is not None:
                named = cues[s.objects[0].colour]
            else:
                named = s.objects[0].colour if cfg.game_bare > 0 and rng.random() < cfg.game_bare else caption(s)
            items.append(f"{named} {VQA_FORMAT.format(question='what colour is it?', answer=answer)}")
        return intro + sep.join(items)
    if kind == "implicit":  # described scenes answered with no question: earlier answers say what is asked
        qtype = rng.choice(IMPLICIT_TYPES)
        items = []
        for _ in range(rng.randint(2, 6)):
            s = implicit_scene(rng, cfg, qtype, rng.choice(_alternatives(cfg, qtype)))
            items.append(f"{caption(s)} {IMPLICIT_FORMAT.format(answer=implicit_answer(s, qtype))}")
        return sep.join(items)
    if kind == "video_qa":
        items = []
        for _ in range(rng.randint(2, 3)):
            clip = sample_clip(rng, cfg)
            _, q, a = clip_question(rng, clip)
            items.append(f"{clip_caption(clip, rng.randrange(4))} {VQA_FORMAT.format(question=q, answer=a)}")
        return sep.join(items)
    sentences = []
    for _ in range(rng.randint(3, 6)):
        r = rng.random()
        if r < 0.25:
            c = rng.choice(cfg.colours)
            sentences.append(rng.choice(_FRUIT_FACTS).format(fruit=FRUITS[c], colour=c))
        elif r < 0.45:
            s = rng.choice(cfg.shapes)
            sentences.append(rng.choice(_THING_FACTS).format(thing=THINGS[s], shape=s))
        elif r < 0.75:
            sentences.append(caption(sample_scene(rng, cfg)))
        else:
            sentences.append(clip_caption(sample_clip(rng, cfg), rng.randrange(4)))
    return " ".join(sentences)


def lexicon(cfg: WorldConfig) -> list[str]:
    """Every word the world can write, so that even a tiny world's tokenizer knows them all."""
    words = [*COLOURS, *SHAPES, *SIZES, *CELL_NAMES, *NUMBER_WORDS, *ORDINALS, *MOVES, *EVENTS, *NONSENSE,
             *FRUITS.values(), *THINGS.values(), *BACKGROUNDS]
    texts = [" ".join(words)]
    texts += [t for t in (*_INTROS, *_LEADS, *_QUIZ_INTROS, *_GALLERY_INTROS, *_GAME_INTROS, *_FRUIT_FACTS,
                          *_THING_FACTS, VQA_FORMAT, CAPTION_FORMAT)]
    texts += ["what colour is the shape that appears? what shape disappears? which way does it move? goes "
              "changes turns moves appears disappears from to. how many shapes are there? where is the object? "
              "it has shapes on this page. in all there are. the picture has the most shapes. of the pictures show. "
              "we can see this shows an image with on a dark background there is a picture of. "
              "a picture. nice picture of shapes. an image. some art. above below left right of and"]
    return texts


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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


def sample_texts(sample: dict) -> list[str]:
    """The text a sample holds (for the tokenizer)."""
    meta = sample.get("json")
    if isinstance(meta, dict) and "text_list" in meta:
        return list(meta["text_list"])
    if "txt" in sample:
        return [sample["txt"]]
    if isinstance(meta, dict):
        return [t for t in [meta.get("question"), *meta.get("answers", []), *meta.get("captions", [])] if t]
    return []


def _shard_ranges(n: int, n_shards: int) -> list[range]:
    bounds = [round(i * n / n_shards) for i in range(n_shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n_shards)]


def _write_shard(job: tuple) -> dict:
    """Write one shard (runs in a worker process); return its texts and counts."""
    import webdataset as wds

    cfg_dict, out_dir, name, kind, split, what, lo, hi = job
    cfg = WorldConfig(**cfg_dict)
    texts: list[str] = []
    n_images = 0
    answers: list[tuple[str, str]] = []
    with wds.TarWriter(str(Path(out_dir) / name), encoder=False, mtime=MTIME) as w:
        for index in range(lo, hi):
            if kind == "source":
                sample = _source_maker(what)(cfg, split, index)
            else:
                sample = make_task_sample(cfg, what, split, index)
                meta = sample["json"]
                if meta["answers"]:
                    answers.append((meta["qtype"], meta["answers"][0]))
            texts.extend(sample_texts(sample))
            n_images += sum(k.endswith(".png") or k == "png" for k in sample)
            w.write(encode_sample(sample))
    return {"name": name, "texts": texts, "n_images": n_images, "n": hi - lo, "answers": answers}


def _clear_old(out_dir: Path) -> None:
    """Remove what a previous write_world left (only our own files)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for pattern in ("train/*.tar", "val/*.tar", "tasks/*/*.tar", "corpus/*.txt", "tokenizer/*"):
        for p in out_dir.glob(pattern):
            if p.is_file():
                p.unlink()


def answer_balance(answers: list[tuple[str, str]]) -> dict[str, float]:
    """Per question type, the share of its most frequent answer."""
    by_type: dict[str, Counter] = {}
    for qtype, a in answers:
        by_type.setdefault(qtype, Counter())[a] += 1
    return {q: round(max(c.values()) / sum(c.values()), 3) for q, c in sorted(by_type.items())}


def world_identity(config: dict) -> dict:
    """A world config as its identity: the keys of :data:`BACKWARD_DEFAULTS` left out at their backward value
    (a world written before they existed is the same world) and :data:`WRITE_SETTINGS` at theirs."""
    out = {k: v for k, v in config.items() if not (k in BACKWARD_DEFAULTS and v == BACKWARD_DEFAULTS[k])}
    return {**out, **{k: v for k, v in WRITE_SETTINGS.items() if k in out}}


def write_world(cfg: WorldConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Write the world's shards, corpus, tokenizer and ``world.json`` to ``out_dir``; return the manifest.

    Layout: ``{train,val}/{source}-{shard:06d}.tar``, ``tasks/{task}/{support,test}-{shard:06d}.tar``,
    ``corpus/{train,val}.txt``, ``tokenizer/`` (a Hugging Face tokenizer folder) and ``world.json``,
    written last. Shards are written by ``cfg.workers`` processes; the bytes do not depend on it.
    """
    from tqdm.auto import tqdm

    from flamingo_lab.data.tokenizer import train_word_tokenizer

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old(out_dir)

    cfg_dict = asdict(cfg)
    jobs: list[tuple] = []
    shards: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    tasks: dict[str, dict] = {}
    for split in SPLITS:
        (out_dir / split).mkdir(exist_ok=True)
        for source in SOURCES:
            n = cfg.count(split, source)
            names = []
            for i, idx in enumerate(_shard_ranges(n, cfg.n_shards(n))):
                names.append(f"{split}/{source}-{i:06d}.tar")
                jobs.append((cfg_dict, str(out_dir), names[-1], "source", split, source, idx.start, idx.stop))
            shards[split][source] = names
    for task, (kind, metric, frames, in_context) in TASKS.items():
        (out_dir / "tasks" / task).mkdir(parents=True, exist_ok=True)
        splits = {}
        for split in TASK_SPLITS:
            n = task_count(cfg, task, split)
            names = []
            for i, idx in enumerate(_shard_ranges(n, cfg.n_shards(n))):
                names.append(f"tasks/{task}/{split}-{i:06d}.tar")
                jobs.append((cfg_dict, str(out_dir), names[-1], "task", split, task, idx.start, idx.stop))
            splits[split] = names
        tasks[task] = {"kind": kind, "metric": metric, "splits": splits, "frames": frames or cfg.frames,
                       "in_context": in_context}
        if task in QUERY_ONLY_ZERO_SHOT:
            tasks[task]["zero_shot_text_examples"] = 0

    total = sum(j[-1] - j[-2] for j in jobs)
    bar = tqdm(total=total, desc=f"world {cfg.name}", unit="sample", disable=not progress)
    results: dict[str, dict] = {}
    if cfg.workers > 1:
        import multiprocessing as mp

        jobs_big_first = sorted(jobs, key=lambda j: -(j[-1] - j[-2]))
        with mp.get_context("fork").Pool(cfg.workers) as pool:
            for r in pool.imap_unordered(_write_shard, jobs_big_first):
                results[r["name"]] = r
                bar.update(r["n"])
    else:
        for job in jobs:
            r = _write_shard(job)
            results[r["name"]] = r
            bar.update(r["n"])
    bar.close()

    texts: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {s: cfg.count(split, s) for s in SOURCES}
        counts[split]["images"] = sum(results[n]["n_images"] for s in SOURCES for n in shards[split][s])
        for s in SOURCES:
            for n in shards[split][s]:
                texts.extend(results[n]["texts"])
    balance = {}
    for task, spec in tasks.items():
        spec["counts"] = {sp: task_count(cfg, task, sp) for sp in TASK_SPLITS}
        answers = [a for sp in TASK_SPLITS for n in spec["splits"][sp] for a in results[n]["answers"]]
        if answers:
            balance[task] = answer_balance(answers)
        for sp in TASK_SPLITS:
            for n in spec["splits"][sp]:
                texts.extend(results[n]["texts"])

    (out_dir / "corpus").mkdir(exist_ok=True)
    corpus = {}
    for split in SPLITS:
        n = getattr(cfg, f"n_corpus_{split}")
        paragraphs = [corpus_paragraph(cfg, split, i) for i in range(n)]
        (out_dir / "corpus" / f"{split}.txt").write_text("".join(p + "\n" for p in paragraphs))
        corpus[split] = f"corpus/{split}.txt"
        texts.extend(p.replace(EOC_TOKEN, " ") for p in paragraphs)  # a special token, not words to learn
    texts.extend(lexicon(cfg))

    tok = train_word_tokenizer(texts, out_dir / "tokenizer")
    manifest = {
        "format": WORLD_FORMAT,
        "name": cfg.name,
        "config": cfg_dict,
        "counts": counts,
        "shards": shards,
        "tasks": tasks,
        "corpus": corpus,
        "facts": {"fruit_of_colour": {c: FRUITS[c] for c in cfg.colours},
                  "thing_of_shape": {s: THINGS[s] for s in cfg.shapes}},
        "held_out": cfg.held_out,
        "answer_balance": balance,
        "prompts": {"caption": "<image>" + CAPTION_FORMAT + "<|endofchunk|>",
                    "vqa": "<image>" + VQA_FORMAT + "<|endofchunk|>",
                    "implicit_question": "<image>" + IMPLICIT_FORMAT + "<|endofchunk|>"},
        "tokenizer": "tokenizer",
        "vocab_size": len(tok),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)  # world.json appears only once everything else is written
    log.debug("wrote world %r to %s in %.1f s", cfg.name, out_dir, manifest["elapsed_s"])
    return manifest
