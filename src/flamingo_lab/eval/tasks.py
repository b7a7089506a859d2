"""Evaluation tasks on disk: a manifest's ``tasks`` entry and the WebDataset shards it names.

A manifest is the embedded world's ``world.json`` or the one ``flamingo-import`` writes beside
real-format files (COCO captions, VQAv2); both hold::

    "tasks": {"<task>": {"kind": "caption" | "vqa" | "video_qa" | "video_caption",
                         "metric": "cider" | "vqa_accuracy" | "top1",
                         "splits": {"support": [shards], "test": [shards]},
                         "frames": 1 | F, "in_context": false | true, "classes": [...] (optional),
                         "zero_shot_text_examples": n (optional: overrides eval.zero_shot_text_examples)}}

Each sample: images ``0.png`` .. ``{F-1}.png`` (the frames of a clip, or one still) and ``json``
``{"id", "question", "answers", "captions", "episode", ...}``; every other json field lands in
``Item.meta`` (``qtype``, ``held_out``, ``scene``: what the evaluation's breakdown groups on). Shard paths
may be relative to the manifest's folder. In a world written by ``flamingo-data``, ``held_out`` is read as true
only where the item's scene shows one of the world's held-out colour-shape pairs (``held_out_pairs``). Only images, json and txt are decoded (never unpickled); a
sample that cannot be decoded raises, naming its shard and key.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from flamingo_lab.data.shards import SkipSample, decode_sample, tar_members

MANIFEST_NAMES = ("world.json", "tasks.json", "manifest.json")
KINDS = ("caption", "vqa", "video_qa", "video_caption")
METRICS = ("cider", "vqa_accuracy", "top1")
REWRITE = ("rewrite that folder (`flamingo-import ... out_dir=<folder>` for an imported one, "
           "`flamingo-data out_dir=<folder>` for a world)")


@dataclass
class Task:
    name: str
    kind: str
    metric: str
    support: list[str]
    test: list[str]
    frames: int = 1
    in_context: bool = False
    classes: list[str] | None = None
    # text-only examples in this task's 0-shot prompt, where the task fixes it (None: eval.zero_shot_text_examples);
    # 0 for a task whose support texts alone say what the shots are there to say (implicit_question)
    zero_shot_text_examples: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}; got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric must be one of {METRICS}; got {self.metric!r}")
        if not self.test:
            raise ValueError(f"task {self.name!r} has no test shards")


@dataclass
class Item:
    """One evaluation example: its frames (one still, or F frames of a clip) and its texts."""

    id: str
    images: list[Image.Image]
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    episode: Any = None
    meta: dict = field(default_factory=dict)


def find_manifest(root: str | Path) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"no task manifest in {root} (looked for {', '.join(MANIFEST_NAMES)}): pass a world root written by "
        "`flamingo-data` or a folder written by `flamingo-import`"
    )


def load_tasks(root: str | Path) -> dict[str, Task]:
    """The tasks of a world root or an imported folder (``{}`` if its manifest has none)."""
    path = find_manifest(root)
    manifest = json.loads(path.read_text())
    base = path.parent.resolve()
    tasks = {}
    for name, spec in (manifest.get("tasks") or {}).items():
        splits = spec.get("splits", {})

        def resolve(paths):
            out = [str(p if Path(p).is_absolute() else base / p) for p in paths or []]
            missing = [p for p in out if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"task {name!r} lists shards that are missing: {missing[:3]}")
            return out

        tasks[name] = Task(
            name=name, kind=spec["kind"], metric=spec["metric"], support=resolve(splits.get("support")),
            test=resolve(splits.get("test")), frames=int(spec.get("frames", 1)),
            in_context=bool(spec.get("in_context", False)), classes=spec.get("classes"),
            zero_shot_text_examples=spec.get("zero_shot_text_examples"),
        )
    return tasks


def is_embedded_world(root: str | Path) -> bool:
    """True for a world written by ``flamingo-data`` (its manifest also lists training shards)."""
    manifest = json.loads(find_manifest(root).read_text())
    return "shards" in manifest or str(manifest.get("format", "")).startswith("flamingo-lab-world")


def _raw_samples(shards: list[str]):
    """The shards' samples in order; a shard cut short raises (tarfile alone would end it quietly where the
    cut falls in a member header, and the task would silently be scored on fewer items)."""
    for url in shards:
        with open(url, "rb") as f:
            yield from wds.tariterators.group_by_keys(tar_members(f, url))


_HELD_OUT_CACHE: dict[tuple, frozenset | None] = {}


def held_out_pairs(shard: str | Path) -> frozenset[tuple[str, str]] | None:
    """The held-out (colour, shape) pairs of the ``flamingo-data`` world that holds the task shard ``shard``
    (its ``world.json``, ``tasks/<task>/`` above it), or None for a shard outside such a world (imported files)."""
    for folder in list(Path(shard).resolve().parents)[:3]:
        manifest = folder / "world.json"
        try:
            st = os.stat(manifest)
        except OSError:
            continue
        key = (str(manifest), st.st_mtime_ns, st.st_size)  # a world rewritten in place is read again
        if key not in _HELD_OUT_CACHE:
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                m = None
            ok = isinstance(m, dict) and str(m.get("format", "")).startswith("flamingo-lab-world") \
                and isinstance(m.get("held_out"), list)
            _HELD_OUT_CACHE[key] = frozenset(tuple(p) for p in m["held_out"]) if ok else None
        return _HELD_OUT_CACHE[key]
    return None


def _relabel_held_out(item: Item, held: frozenset) -> None:
    """``held_out`` true only where the scene shows one of ``held`` (a held-out colour-shape pair).

    The world draws a held-out test item's target among the held-out pairs of the colour (or shape) it asks
    about and, where that colour has none (purple in the embedded world), falls back to a seen pair while
    still writing ``held_out: true``. In the embedded world (seed 0, 300 test items a task) 10 of okvqa's 89
    such items, 23 of renamed_colours' 97, 6 of implicit_question's 90 and 4 of vqav2's 89 show no held-out
    pair: read as written, the breakdown's ``held_out=True`` group mixed seen pairs into the held-out score.
    Corrected here, on reading, so that every world already written (its shards, stages and runs) stays valid.
    """
    scene = item.meta.get("scene")
    objects = scene.get("objects") if isinstance(scene, dict) else None
    if not item.meta.get("held_out") or not isinstance(objects, list):
        return
    item.meta["held_out"] = any((o.get("colour"), o.get("shape")) in held for o in objects if isinstance(o, dict))


def read_items(shards: list[str], frames: int, limit: int | None = None) -> list[Item]:
    """The samples of ``shards`` in order (at most ``limit``), decoded explicitly. In a ``flamingo-data`` world an
    item's ``held_out`` says whether its scene shows a held-out colour-shape pair (``_relabel_held_out``)."""
    items: list[Item] = []
    try:
        if limit is not None and limit <= 0:
            return items
        held: dict[str, frozenset | None] = {}  # shard -> its world's held-out pairs
        for raw in _raw_samples(shards):
            item = _item(raw, frames)
            url = str(raw.get("__url__"))
            if url not in held:
                held[url] = held_out_pairs(url)
            if held[url] is not None:
                _relabel_held_out(item, held[url])
            items.append(item)
            if limit is not None and len(items) >= limit:
                break  # before reading on: what lies past the items asked for is not read
    except tarfile.ReadError as exn:
        raise ValueError(f"a task shard is damaged ({exn}): {REWRITE}") from exn
    return items


def _item(raw: dict, frames: int) -> Item:
    where = f"{raw.get('__url__')}:{raw.get('__key__')}"  # shard:sample
    try:
        sample = decode_sample(raw)
    except SkipSample as exn:  # a task sample is never skipped: the scores would silently cover fewer items
        raise ValueError(f"task sample {where} cannot be read ({exn.reason}: {exn}): its shard is damaged; "
                         f"{REWRITE}") from exn
    meta = sample.get("json") or {}
    images = [sample[f"{f}.png"] for f in range(frames) if f"{f}.png" in sample]
    if not images:  # a still saved under another image name (jpg, png)
        images = [sample[k] for k in sorted(sample) if k.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg")][:1]
    if len(images) != frames:
        raise ValueError(f"task sample {where} has {len(images)} frames; the task says {frames}: {REWRITE}")
    captions = meta.get("captions") or ([sample["txt"]] if "txt" in sample else [])
    return Item(
        id=str(meta.get("id", sample.get("__key__"))), images=images, question=meta.get("question"),
        answers=list(meta.get("answers") or []), captions=list(captions), episode=meta.get("episode"),
        meta={k: v for k, v in meta.items() if k not in ("question", "answers", "captions")},
    )
