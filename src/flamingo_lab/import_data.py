"""`flamingo-import`: COCO captions, VQAv2 or OK-VQA questions/annotations + an image folder -> evaluation shards.

    flamingo-import kind=coco captions=annotations/captions_val2014.json images=val2014 out_dir=data/real
    flamingo-import kind=vqav2 questions=v2_OpenEnded_mscoco_val2014_questions.json \\
        annotations=v2_mscoco_val2014_annotations.json images=val2014 out_dir=data/real n_test=5000
    flamingo-import kind=okvqa questions=OpenEnded_mscoco_val2014_questions.json \\
        annotations=mscoco_val2014_annotations.json images=val2014 out_dir=data/real

The output folder holds ``tasks/{task}/{support,test}-{shard:06d}.tar`` in the evaluation format of
the embedded world's tasks (``0.png`` and ``json`` = {id, question, answers, captions, episode, scene};
a VQA item also has ``qtype``, its answer type: yes/no, number or other, which the evaluation's
breakdown groups on) and a ``world.json`` with ``tasks`` only, so ``flamingo-eval data_root=<out_dir>``
reads it as it reads the embedded world. The task is named by ``kind`` (OK-VQA is ``okvqa``, scored
against OK-VQA's reference). One folder may hold several imports (their tasks are merged; a task
imported again replaces its shards); a folder holding a ``flamingo-data`` world is refused.
Images are re-encoded as PNG (optionally resized: ``image_size=``). Items are split into support and
test by a seeded shuffle of the image ids (support and test never share an image). Questions without an
annotation and images that are missing or undecodable are skipped and counted per task
(``world.json`` ``skipped``); an import that would leave a task empty raises instead.
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

FORMAT = "flamingo-lab-tasks/1"  # world.json of an imported folder (a flamingo-data world: flamingo-lab-world/*)
#: kind -> (task kind, metric); the task is named by the kind (its reference in the Overall is that task's)
KINDS = {"coco": ("caption", "cider"), "vqav2": ("vqa", "vqa_accuracy"), "okvqa": ("vqa", "vqa_accuracy")}
#: the files each kind reads, as the error messages name them
VQA_FILES = {"vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
             "okvqa": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")}
#: image file names tried (after the captions JSON's file_name), by image id
IMAGE_NAMES = ("COCO_val2014_{:012d}.jpg", "COCO_train2014_{:012d}.jpg", "{:012d}.jpg", "{}.jpg", "{}.png")
SHOWN_NAMES = ("COCO_val2014_<12-digit id>.jpg, COCO_train2014_<12-digit id>.jpg, <12-digit id>.jpg, <id>.jpg "
               "or <id>.png")


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
    for pattern in IMAGE_NAMES:
        if (images / pattern.format(image_id)).is_file():
            return images / pattern.format(image_id)
    return images / IMAGE_NAMES[0].format(image_id)


def _load(path: str | Path, arg: str, expect: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg}={path} does not exist: pass {expect}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{arg}={path} is not valid JSON ({exn}): pass {expect}") from None


def _records(data: Any, path: str | Path, arg: str, key: str, fields: tuple[str, ...], expect: str) -> list[dict]:
    """The ``key`` list of ``data`` (the JSON file ``path``, passed as ``arg=``), each entry with ``fields``; raises
    naming the file to pass (``expect``) when the file is another one (instances_*.json, the two VQA files swapped)."""
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        top = sorted(data)[:8] if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        swapped = {"questions": "annotations", "annotations": "questions"}.get(key)
        hint = (f" (it looks like the {swapped} file: are questions= and annotations= swapped?)"
                if arg in ("questions", "annotations") and isinstance(data, dict) and swapped in data else "")
        raise ValueError(f"{arg}={path} has no {key!r} list (top level: {top}){hint}: pass {expect}")
    for r in records:
        missing = [f for f in fields if not isinstance(r, dict) or f not in r]
        if missing:
            shown = sorted(r)[:8] if isinstance(r, dict) else f"a JSON {type(r).__name__}"
            raise ValueError(f"{arg}={path}: an entry of {key!r} has no {missing} (its keys: {shown}), so this is "
                             f"not the file {arg}= reads: pass {expect}")
    return records


def coco_items(captions: str | Path) -> tuple[list[dict], dict[int, str]]:
    """COCO captions JSON -> items {image_id, captions} (in image id order) and image id -> file name."""
    expect = ("a COCO captions file (annotations/captions_val2014.json), whose 'annotations' each have a 'caption' "
              "(instances_*.json and person_keypoints_*.json have none)")
    data = _load(captions, "captions", expect)
    anns = _records(data, captions, "captions", "annotations", ("image_id", "caption"), expect)
    file_names = {int(im["id"]): im["file_name"] for im in data.get("images", []) if "file_name" in im}
    caps: dict[int, list[str]] = defaultdict(list)
    for a in anns:
        caps[int(a["image_id"])].append(str(a["caption"]).strip())
    if not caps:
        raise ValueError(f"captions={captions} holds no captions (its 'annotations' list is empty): pass {expect}")
    items = [{"image_id": i, "id": str(i), "question": None, "answers": [], "captions": caps[i]} for i in sorted(caps)]
    return items, file_names


def vqav2_items(questions: str | Path, annotations: str | Path, kind: str = "vqav2") -> tuple[list[dict], Counter]:
    """VQAv2 (or OK-VQA: the same format) question and annotation JSON -> items {image_id, id, question,
    answers (10 human answers), qtype (the answer type: yes/no, number, other), question_type, answer_type},
    and the questions skipped (``no_annotation``: a question whose id the annotations do not have)."""
    q_name, a_name = VQA_FILES[kind]
    q_expect = f"the *_questions.json with a 'questions' list (e.g. {q_name})"
    a_expect = f"the *_annotations.json with an 'annotations' list of answers (e.g. {a_name})"
    qs = _records(_load(questions, "questions", q_expect), questions, "questions", "questions",
                  ("question_id", "image_id", "question"), q_expect)
    anns = _records(_load(annotations, "annotations", a_expect), annotations, "annotations", "annotations",
                    ("question_id", "answers"), a_expect)
    anns = {int(a["question_id"]): a for a in anns}
    if not qs:
        raise ValueError(f"questions={questions} holds no questions: pass the *_questions.json (e.g. {q_name})")
    items, skipped = [], Counter()
    for q in sorted(qs, key=lambda q: int(q["question_id"])):
        a = anns.get(int(q["question_id"]))
        if a is None:
            skipped["no_annotation"] += 1
            continue
        items.append({
            "image_id": int(q["image_id"]), "id": str(q["question_id"]), "question": str(q["question"]),
            "answers": [str(x["answer"]) for x in a["answers"]], "captions": [],
            "question_type": a.get("question_type"), "answer_type": a.get("answer_type"),
        })
    if not items:
        raise ValueError(
            f"none of the {len(qs)} questions in questions={questions} has an annotation in annotations={annotations} "
            f"(no question id in common): are the two files from the same split (e.g. {q_name} with {a_name})?"
        )
    if skipped:
        log.warning("%d of %d questions have no annotation in %s: skipped", skipped["no_annotation"], len(qs),
                    annotations)
    return items, skipped


def check_out_dir(out_dir: str | Path) -> dict:
    """The manifest an earlier ``flamingo-import`` wrote in ``out_dir`` ({} if none); raises if ``out_dir``
    holds another world.json (a ``flamingo-data`` world: importing there would overwrite its manifest and
    some of its task shards)."""
    path = Path(out_dir) / "world.json"
    if not path.is_file():
        return {}
    where = "import into its own folder (e.g. data/real) and evaluate with data_root=<that folder>"
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"out_dir={out_dir} holds a world.json that is not valid JSON ({exn}): {where}") from None
    fmt = old.get("format") if isinstance(old, dict) else None
    if fmt == FORMAT:
        return old
    if str(fmt).startswith("flamingo-lab-world") or (isinstance(old, dict) and "config" in old):
        raise ValueError(f"out_dir={out_dir} holds a flamingo-data world (format {fmt!r}); {where} "
                         f"(the world's own tasks stay at data_root={out_dir})")
    raise ValueError(f"out_dir={out_dir} holds a world.json in format {fmt!r}, not written by flamingo-import "
                     f"({FORMAT!r}); {where}")


def write_task(items: list[dict], images: str | Path, out_dir: str | Path, task: str, *, n_support: int,
               n_test: int | None, seed: int = 0, shard_size: int = 1000, image_size: int | None = None,
               file_names: dict[int, str] | None = None, skipped: dict[str, int] | None = None) -> dict:
    """Split ``items`` by image into support/test, write the shards and ``world.json``; return the manifest.

    ``skipped``: items dropped before (reason -> count, e.g. ``no_annotation``), added to the task's counts.
    Nothing is written if ``out_dir`` holds a flamingo-data world, ``images`` has none of the items'
    images, or the test split would be empty."""
    import webdataset as wds

    t0 = time.perf_counter()
    kind, metric = KINDS[task]
    images, out_dir = Path(images), Path(out_dir)
    check_out_dir(out_dir)
    if not images.is_dir():
        raise FileNotFoundError(f"images={images} is not a folder: pass the folder of the images (e.g. val2014)")
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
    if not split_items["test"]:
        raise ValueError(f"{task}: n_support={n_support} and n_test={n_test} leave no test item of the {len(items)} "
                         f"items: lower n_support (or raise n_test)")
    ids = list(dict.fromkeys(it["image_id"] for its in split_items.values() for it in its))
    if not any(_image_path(images, i, file_names or {}).is_file() for i in ids):
        raise FileNotFoundError(
            f"no image found under images={images} for any of the {len(ids)} images of {task} (e.g. "
            f"{_image_path(images, ids[0], file_names or {}).name}): expected the file_name the captions JSON gives, "
            f"else {SHOWN_NAMES}. Is images= the folder of the annotations' split (val2014 for *val2014*.json)?"
        )
    task_dir = out_dir / "tasks" / task
    task_dir.mkdir(parents=True, exist_ok=True)
    for split in split_items:  # an earlier import of this task: none of its shards may outlive this one
        for old_shard in task_dir.glob(f"{split}-*.tar"):
            old_shard.unlink()
    skipped = Counter(skipped or {})
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
                            "captions": it["captions"], "episode": None, "scene": {"image_id": iid}}
                    if it.get("answer_type") is not None:  # the standard VQAv2 breakdown: yes/no, number, other
                        meta["qtype"] = it["answer_type"]
                    meta.update({k: it[k] for k in ("question_type", "answer_type") if it.get(k) is not None})
                    w.write({"__key__": f"{task}-{split}-{it['id']}", "0.png": png_cache[iid],
                             "json": json.dumps(meta, sort_keys=True).encode()})
                    n_written += 1
            names.append(name)
        splits[split], counts[split] = names, n_written
    empty = [split for split in ("support", "test") if not counts[split] and (split == "test" or n_support)]
    if empty:  # no test item: nothing to score; no support item: every k-shot prompt would hold no shot
        for split_names in splits.values():
            for name in split_names:
                (out_dir / name).unlink(missing_ok=True)
        which = "" if len(empty) == 2 else f"{empty[0]} "
        reseed = f", or draw other support images (seed={seed})" if empty == ["support"] else ""
        raise ValueError(f"no {which}item of {task} written: every {which}image was skipped ({dict(skipped)}; the "
                         f"warnings above name the files): check images={images}{reseed}")
    if counts["support"] < len(split_items["support"]):
        log.warning("%s: %d of the %d support items written (their images were skipped)", task, counts["support"],
                    len(split_items["support"]))
    manifest = {
        "format": FORMAT,
        "name": task,
        "tasks": {task: {"kind": kind, "metric": metric, "splits": splits, "frames": 1, "in_context": False,
                         "counts": counts}},
        "skipped": {task: dict(skipped)},  # per task: reason -> count
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    old = check_out_dir(out_dir)
    if old:  # one folder may hold coco, vqav2 and okvqa: merge their tasks and their skipped counts
        manifest["tasks"] = {**old.get("tasks", {}), **manifest["tasks"]}
        manifest["name"] = "+".join(sorted(manifest["tasks"]))
        earlier = {t: s for t, s in (old.get("skipped") or {}).items()
                   if t in manifest["tasks"] and isinstance(s, dict)}
        manifest["skipped"] = {**earlier, **manifest["skipped"]}  # (a flat {reason: n} of older imports is dropped)
    tmp = out_dir / "world.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "world.json")  # last: a failed import leaves the manifest as it was
    return manifest


def run(cfg: Any) -> dict:
    kind = cfg["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    check_out_dir(cfg["out_dir"])  # before reading the (large) JSON files
    common = dict(n_support=int(cfg["n_support"]), n_test=cfg.get("n_test"), seed=int(cfg["seed"]),
                  shard_size=int(cfg["shard_size"]), image_size=cfg.get("image_size"))
    if kind == "coco":
        if not cfg.get("captions"):
            raise ValueError("kind=coco needs captions=<captions_*.json>")
        items, names = coco_items(cfg["captions"])
        manifest = write_task(items, cfg["images"], cfg["out_dir"], "coco", file_names=names, **common)
    else:  # vqav2, okvqa: one format, each its own task
        if not (cfg.get("questions") and cfg.get("annotations")):
            q_name, a_name = VQA_FILES[kind]
            raise ValueError(f"kind={kind} needs questions=<*_questions.json> and annotations=<*_annotations.json> "
                             f"(e.g. questions={q_name} annotations={a_name})")
        items, dropped = vqav2_items(cfg["questions"], cfg["annotations"], kind)
        manifest = write_task(items, cfg["images"], cfg["out_dir"], kind, skipped=dropped, **common)
    log.info("imported %s to %s in %.1f s: %s; skipped %s", kind, cfg["out_dir"], manifest["elapsed_s"],
             manifest["tasks"][kind]["counts"], manifest["skipped"][kind])
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
