"""`flamingo-import`: COCO captions or VQAv2 questions/annotations + an image folder -> evaluation shards.

    flamingo-import kind=coco captions=annotations/captions_val2014.json images=val2014 out_dir=data/coco
    flamingo-import kind=vqav2 questions=v2_OpenEnded_mscoco_val2014_questions.json \\
        annotations=v2_mscoco_val2014_annotations.json images=val2014 out_dir=data/vqav2 n_test=5000

The output folder holds ``tasks/{task}/{support,test}-{shard:06d}.tar`` in the evaluation format of
the embedded world's tasks (``0.png`` and ``json`` = {id, question, answers, captions, episode, scene})
and a ``world.json`` with ``tasks`` only, so ``flamingo-eval data.root=<out_dir>`` reads it as it reads
the embedded world. Images are re-encoded as PNG (optionally resized: ``image_size=``). Items are
split into support and test by a seeded shuffle of the image ids (support and test never share an
image). Images that are missing or undecodable are skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger("flamingo_lab.import_data")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
MTIME = 946684800.0

KINDS = {"coco": ("caption", "cider"), "vqav2": ("vqa", "vqa_accuracy")}


def _png(path: Path, image_size: int | None) -> bytes:
    with Image.open(path) as img:
        img.load()
        img = img.convert("RGB")
        if image_size:
            img = img.resize((image_size, image_size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def _image_path(images: Path, image_id: int, file_names: dict[int, str]) -> Path:
    if image_id in file_names:
        return images / file_names[image_id]
    for pattern in (f"COCO_val2014_{image_id:012d}.jpg", f"COCO_train2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg",
                    f"{image_id}.jpg", f"{image_id}.png"):
        if (images / pattern).is_file():
            return images / pattern
    return images / f"COCO_val2014_{image_id:012d}.jpg"


def coco_items(captions: str | Path) -> tuple[list[dict], dict[int, str]]:
    """COCO captions JSON -> items {image_id, captions} (in image id order) and image id -> file name."""
    data = json.loads(Path(captions).read_text())
    file_names = {int(im["id"]): im["file_name"] for im in data.get("images", [])}
    caps: dict[int, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        caps[int(a["image_id"])].append(str(a["caption"]).strip())
    items = [{"image_id": i, "id": str(i), "question": None, "answers": [], "captions": caps[i]} for i in sorted(caps)]
    return items, file_names


def vqav2_items(questions: str | Path, annotations: str | Path) -> list[dict]:
    """VQAv2 question and annotation JSON -> items {image_id, id, question, answers (10 human answers)}."""
    qs = json.loads(Path(questions).read_text())["questions"]
    anns = {int(a["question_id"]): a for a in json.loads(Path(annotations).read_text())["annotations"]}
    items = []
    for q in sorted(qs, key=lambda q: int(q["question_id"])):
        a = anns.get(int(q["question_id"]))
        if a is None:
            continue
        items.append({
            "image_id": int(q["image_id"]), "id": str(q["question_id"]), "question": str(q["question"]),
            "answers": [str(x["answer"]) for x in a["answers"]], "captions": [],
            "question_type": a.get("question_type"), "answer_type": a.get("answer_type"),
        })
    return items


def write_task(items: list[dict], images: str | Path, out_dir: str | Path, task: str, *, n_support: int,
               n_test: int | None, seed: int = 0, shard_size: int = 1000, image_size: int | None = None,
               file_names: dict[int, str] | None = None) -> dict:
    """Split ``items`` by image into support/test, write the shards and ``world.json``; return the manifest."""
    import webdataset as wds

    t0 = time.perf_counter()
    kind, metric = KINDS[task]
    images, out_dir = Path(images), Path(out_dir)
    (out_dir / "tasks" / task).mkdir(parents=True, exist_ok=True)
    image_ids = sorted({it["image_id"] for it in items})
    random.Random(seed).shuffle(image_ids)
    by_image = defaultdict(list)
    for it in items:
        by_image[it["image_id"]].append(it)
    support_ids, rest = [], list(image_ids)
    while rest and sum(len(by_image[i]) for i in support_ids) < n_support:
        support_ids.append(rest.pop(0))
    split_items = {
        "support": [it for i in support_ids for it in by_image[i]][:n_support],
        "test": [it for i in rest for it in by_image[i]],
    }
    if n_test is not None:
        split_items["test"] = split_items["test"][:n_test]
    skipped: Counter = Counter()
    splits, counts = {}, {}
    png_cache: dict[int, bytes] = {}
    for split, its in split_items.items():
        names, n_written = [], 0
        n_shards = max(1, -(-len(its) // shard_size))
        for s in range(n_shards):
            name = f"tasks/{task}/{split}-{s:06d}.tar"
            with wds.TarWriter(str(out_dir / name), encoder=False, mtime=MTIME) as w:
                for it in its[s * shard_size:(s + 1) * shard_size]:
                    iid = it["image_id"]
                    if iid not in png_cache:
                        path = _image_path(images, iid, file_names or {})
                        try:
                            png_cache.clear()  # items of one image are adjacent: keep one
                            png_cache[iid] = _png(path, image_size)
                        except FileNotFoundError:
                            skipped["missing_image"] += 1
                            continue
                        except Exception as exn:  # noqa: BLE001 - PIL raises many kinds
                            log.warning("skipped image %s (%s: %s)", path, type(exn).__name__, exn)
                            skipped["bad_image"] += 1
                            continue
                    meta = {"id": it["id"], "question": it["question"], "answers": it["answers"],
                            "captions": it["captions"], "episode": None,
                            "scene": {"image_id": iid, **{k: it[k] for k in ("question_type", "answer_type") if k in it}}}
                    w.write({"__key__": f"{task}-{split}-{it['id']}", "0.png": png_cache[iid],
                             "json": json.dumps(meta, sort_keys=True).encode()})
                    n_written += 1
            names.append(name)
        splits[split], counts[split] = names, n_written
    manifest = {
        "format": "flamingo-lab-tasks/1",
        "name": task,
        "tasks": {task: {"kind": kind, "metric": metric, "splits": splits, "frames": 1, "in_context": False,
                         "counts": counts}},
        "skipped": dict(skipped),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    path = out_dir / "world.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("format") == manifest["format"]:  # one folder may hold coco and vqav2: merge their tasks
        manifest["tasks"] = {**old.get("tasks", {}), **manifest["tasks"]}
        manifest["name"] = "+".join(sorted(manifest["tasks"]))
    tmp = out_dir / "world.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return manifest


def run(cfg: Any) -> dict:
    kind = cfg["kind"]
    common = dict(n_support=int(cfg["n_support"]), n_test=cfg.get("n_test"), seed=int(cfg["seed"]),
                  shard_size=int(cfg["shard_size"]), image_size=cfg.get("image_size"))
    if kind == "coco":
        if not cfg.get("captions"):
            raise ValueError("kind=coco needs captions=<captions_*.json>")
        items, names = coco_items(cfg["captions"])
        manifest = write_task(items, cfg["images"], cfg["out_dir"], "coco", file_names=names, **common)
    elif kind == "vqav2":
        if not (cfg.get("questions") and cfg.get("annotations")):
            raise ValueError("kind=vqav2 needs questions=<..._questions.json> and annotations=<..._annotations.json>")
        manifest = write_task(vqav2_items(cfg["questions"], cfg["annotations"]), cfg["images"], cfg["out_dir"],
                              "vqav2", **common)
    else:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    log.info("imported %s to %s in %.1f s: %s; skipped %s", kind, cfg["out_dir"], manifest["elapsed_s"],
             manifest["tasks"][kind]["counts"], manifest["skipped"])
    return manifest


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(config_path=CONF_DIR, config_name="import", version_base="1.3")
    def _main(cfg) -> None:
        run(OmegaConf.to_container(cfg, resolve=True))

    _main()


if __name__ == "__main__":
    main()
