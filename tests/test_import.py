"""flamingo-import: COCO captions, VQAv2 and OK-VQA JSON + an image folder -> task shards the evaluation reads."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from flamingo_lab.data.shards import load_world
from flamingo_lab.import_data import run


def _images(folder, ids):
    folder.mkdir()
    for i in ids:
        Image.new("RGB", (40, 30), (i * 20 % 255, 80, 120)).save(folder / f"COCO_val2014_{i:012d}.jpg")
    (folder / f"COCO_val2014_{99:012d}.jpg").write_bytes(b"not a jpeg")  # undecodable


def _read(paths):
    out = []
    for p in paths:
        with tarfile.open(p) as tf:
            names = tf.getnames()
            metas = [json.loads(tf.extractfile(n).read()) for n in names if n.endswith(".json")]
            assert len([n for n in names if n.endswith(".0.png")]) == len(metas)
            out += metas
    return out


def test_coco_and_vqav2_import_to_the_task_format(tmp_path):
    _images(tmp_path / "img", range(1, 7))
    caps = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in [*range(1, 7), 99]],
            "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"a photo number {i} caption {k}"}
                            for i in [*range(1, 7), 99] for k in range(5)]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    qs = {"questions": [{"image_id": i, "question": f"what is in picture {i}?", "question_id": 100 * i + k}
                        for i in [*range(1, 8)] for k in range(2)]}  # image 7 is missing from the folder
    anns = {"annotations": [{"question_id": 100 * i + k, "image_id": i, "question_type": "what", "answer_type": "other",
                             "multiple_choice_answer": "cat", "answers": [{"answer": "cat", "answer_id": j}
                                                                          for j in range(1, 11)]}
                            for i in range(1, 8) for k in range(2)]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    out = tmp_path / "real"
    common = dict(images=str(tmp_path / "img"), out_dir=str(out), n_support=2, n_test=None, seed=0, shard_size=3,
                  image_size=None)
    m1 = run({"kind": "coco", "captions": str(tmp_path / "captions.json"), **common})
    assert m1["skipped"] == {"coco": {"bad_image": 1}}
    m2 = run({"kind": "vqav2", "questions": str(tmp_path / "q.json"), "annotations": str(tmp_path / "a.json"), **common})
    assert m2["skipped"] == {"coco": {"bad_image": 1}, "vqav2": {"missing_image": 2}}  # per task: coco's survives
    world = load_world(out)  # one folder, both tasks: flamingo-eval reads it like the embedded world
    assert world["tasks"]["coco"]["kind"] == "caption" and world["tasks"]["coco"]["metric"] == "cider"
    assert world["tasks"]["vqav2"]["kind"] == "vqa" and world["tasks"]["vqav2"]["metric"] == "vqa_accuracy"
    coco = {s: _read(world["tasks"]["coco"]["splits"][s]) for s in ("support", "test")}
    assert len(coco["support"]) == 2 and len(coco["support"]) + len(coco["test"]) == 6
    assert all(len(m["captions"]) == 5 and m["question"] is None and m["episode"] is None for m in coco["test"])
    vqa = {s: _read(world["tasks"]["vqav2"]["splits"][s]) for s in ("support", "test")}
    assert len(vqa["support"]) + len(vqa["test"]) == 12
    assert all(len(m["answers"]) == 10 and m["question"].startswith("what") for m in vqa["test"])
    support_images = {m["scene"]["image_id"] for m in vqa["support"]}
    assert not support_images & {m["scene"]["image_id"] for m in vqa["test"]}  # support and test never share an image


def test_flamingo_import_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _images(tmp_path / "img", [1, 2, 3])
    caps = {"annotations": [{"image_id": i, "caption": f"caption {i}"} for i in (1, 2, 3)]}
    (tmp_path / "c.json").write_text(json.dumps(caps))
    exe = Path(sys.executable).parent / "flamingo-import"
    proc = subprocess.run([str(exe), "kind=coco", f"captions={tmp_path / 'c.json'}", f"images={tmp_path / 'img'}",
                           f"out_dir={tmp_path / 'o'}", "n_support=1", "image_size=16"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    world = load_world(tmp_path / "o")
    assert world["tasks"]["coco"]["counts"] == {"support": 1, "test": 2}


# ---------------------------------------------------------------- real files, wrong inputs, and what they leave behind


def _vqa(tmp_path: Path, ids=range(1, 7), *, answered=None, name="") -> dict:
    """VQAv2-format files over images ``ids`` (two questions each: a yes/no one and an "other" one), annotations
    only for the questions of ``answered`` images (default: all); returns the flamingo-import arguments."""
    answered = list(ids) if answered is None else answered
    qs = {"questions": [{"image_id": i, "question": q, "question_id": 100 * i + k}
                        for i in ids for k, q in enumerate(("is it a square?", "what colour is it?"))]}
    anns = {"annotations": [{"question_id": 100 * i + k, "image_id": i, "question_type": qt, "answer_type": at,
                             "answers": [{"answer": a, "answer_id": j} for j in range(1, 11)]}
                            for i in answered for k, (qt, at, a) in enumerate((("is it a", "yes/no", "yes"),
                                                                               ("what color is", "other", "red")))]}
    (tmp_path / f"q{name}.json").write_text(json.dumps(qs))
    (tmp_path / f"a{name}.json").write_text(json.dumps(anns))
    return {"questions": str(tmp_path / f"q{name}.json"), "annotations": str(tmp_path / f"a{name}.json")}


def _captions(tmp_path: Path, ids=range(1, 7)) -> str:
    caps = {"annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"a photo {i} caption {k}"}
                            for i in ids for k in range(5)]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    return str(tmp_path / "captions.json")


def _common(tmp_path: Path, out: Path, **kw) -> dict:
    return {"images": str(tmp_path / "img"), "out_dir": str(out), "n_support": 2, "n_test": None, "seed": 0,
            "shard_size": 3, "image_size": None, **kw}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_import_into_a_flamingo_data_world_is_refused_and_writes_nothing(tmp_path):
    """out_dir holding a flamingo-data world: its world.json and its task shards stay byte for byte."""
    _images(tmp_path / "img", range(1, 7))
    world = tmp_path / "world"
    (world / "tasks" / "coco").mkdir(parents=True)
    for split in ("support", "test"):
        for s in range(4):
            (world / "tasks" / "coco" / f"{split}-{s:06d}.tar").write_bytes(f"world shard {split} {s}".encode())
    (world / "world.json").write_text(json.dumps({"format": "flamingo-lab-world/6", "config": {"name": "tiny"},
                                                  "tasks": {}, "shards": {}}))
    before = _snapshot(world)
    with pytest.raises(ValueError, match=r"holds a flamingo-data world.*import into its own folder \(e\.g\. data/real\)"
                                         r".*data_root="):
        run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, world)})
    with pytest.raises(ValueError, match="holds a flamingo-data world"):
        run({"kind": "vqav2", **_vqa(tmp_path), **_common(tmp_path, world)})
    assert _snapshot(world) == before


def test_reimporting_a_task_leaves_none_of_its_old_shards(tmp_path):
    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, out, shard_size=1)})
    run({"kind": "vqav2", **_vqa(tmp_path), **_common(tmp_path, out)})
    assert len(list((out / "tasks" / "coco").glob("test-*.tar"))) == 4
    run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, out, shard_size=10)})
    world = load_world(out)
    listed = {Path(p) for t in world["tasks"].values() for names in t["splits"].values() for p in names}
    assert listed == set((out / "tasks").rglob("*.tar"))  # every shard on disk is one the manifest names
    assert world["tasks"]["coco"]["counts"] == {"support": 2, "test": 4}
    assert len(_read(world["tasks"]["coco"]["splits"]["test"])) == 4


def test_questions_without_an_annotation_are_counted_per_task(tmp_path):
    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, out)})
    run({"kind": "vqav2", **_vqa(tmp_path, answered=[1, 2, 3, 4]), **_common(tmp_path, out)})
    skipped = json.loads((out / "world.json").read_text())["skipped"]
    assert skipped == {"coco": {}, "vqav2": {"no_annotation": 4}}  # 2 images x 2 questions
    assert load_world(out)["tasks"]["vqav2"]["counts"] == {"support": 2, "test": 6}


def test_inputs_that_would_give_an_empty_task_raise_and_write_nothing(tmp_path):
    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    val = _vqa(tmp_path)
    train = _vqa(tmp_path, ids=range(11, 17), name="_train")  # another split: no question id in common
    with pytest.raises(ValueError, match=r"none of the 12 questions .* has an annotation .* same split"):
        run({"kind": "vqav2", "questions": val["questions"], "annotations": train["annotations"],
             **_common(tmp_path, out)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image found under images=.*empty.*COCO_val2014_<12-digit id>"):
        run({"kind": "vqav2", **val, **_common(tmp_path, out, images=str(tmp_path / "empty"))})
    with pytest.raises(FileNotFoundError, match=r"images=.*imgs is not a folder"):
        run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, out, images=str(tmp_path / "imgs"))})
    with pytest.raises(ValueError, match=r"leave no test item .* lower n_support"):
        run({"kind": "coco", "captions": _captions(tmp_path), **_common(tmp_path, out, n_support=6)})
    assert not out.exists()
    with pytest.raises(ValueError, match=r"no test item of coco written: every test image was skipped .*bad_image"):
        run({"kind": "coco", "captions": _captions(tmp_path, ids=[99]), **_common(tmp_path, out, n_support=0)})
    with pytest.raises(ValueError, match=r"no support item of coco written: .*or draw other support images \(seed=4\)"):
        run({"kind": "coco", "captions": _captions(tmp_path, ids=[1, 2, 99]), **_common(tmp_path, out, n_support=1,
                                                                                        seed=4)})  # 99 is support
    assert not [p for p in out.rglob("*") if p.is_file()]  # its empty shards are removed, no world.json


def test_wrong_json_files_name_the_file_to_pass(tmp_path):
    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    instances = {"images": [], "annotations": [{"image_id": 1, "id": 1, "bbox": [0, 0, 1, 1], "category_id": 3}]}
    (tmp_path / "instances_val2014.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"captions=.*instances_val2014.json.*no \['caption'\].*captions_val2014"):
        run({"kind": "coco", "captions": str(tmp_path / "instances_val2014.json"), **_common(tmp_path, out)})
    files = _vqa(tmp_path)
    with pytest.raises(ValueError, match=r"questions=.*has no 'questions' list.*swapped.*_questions\.json"):
        run({"kind": "vqav2", "questions": files["annotations"], "annotations": files["questions"],
             **_common(tmp_path, out)})
    with pytest.raises(ValueError, match=r"annotations=.*no \[.*'answers'\].*_annotations\.json"):
        run({"kind": "vqav2", "questions": files["questions"], "annotations": _captions(tmp_path),
             **_common(tmp_path, out)})
    assert not out.exists()


def test_imported_vqa_items_carry_their_answer_type_as_qtype_for_the_breakdown(tmp_path):
    from flamingo_lab.eval.harness import breakdown
    from flamingo_lab.eval.tasks import load_tasks, read_items

    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    run({"kind": "vqav2", **_vqa(tmp_path), **_common(tmp_path, out)})
    task = load_tasks(out)["vqav2"]
    items = read_items(task.test, task.frames)
    assert {it.meta["qtype"] for it in items} == {"yes/no", "other"}
    assert {it.meta["question_type"] for it in items} == {"is it a", "what color is"}  # kept beside it
    preds = ["yes" if it.meta["qtype"] == "yes/no" else "blue" for it in items]
    groups = breakdown(task, items, preds)
    assert groups["qtype=yes/no"]["score"] == 100.0 and groups["qtype=other"]["score"] == 0.0
    assert groups["qtype=yes/no"]["n"] + groups["qtype=other"]["n"] == len(items)


def test_okvqa_imports_as_its_own_task_with_its_own_reference(tmp_path):
    from flamingo_lab.eval.harness import resolve_references
    from flamingo_lab.eval.tasks import is_embedded_world, load_tasks

    _images(tmp_path / "img", range(1, 7))
    out = tmp_path / "real"
    run({"kind": "vqav2", **_vqa(tmp_path), **_common(tmp_path, out)})
    run({"kind": "okvqa", **_vqa(tmp_path, ids=range(1, 5), name="_ok"), **_common(tmp_path, out)})
    tasks = load_tasks(out)
    assert set(tasks) == {"vqav2", "okvqa"}
    assert (tasks["okvqa"].kind, tasks["okvqa"].metric) == ("vqa", "vqa_accuracy")
    assert load_world(out)["tasks"]["okvqa"]["counts"] == {"support": 2, "test": 6}
    refs = resolve_references({"reference": "auto"}, tasks, {}, is_embedded_world(out))
    assert refs["okvqa"] == {"value": 54.4, "source": "paper"} and refs["vqav2"] == {"value": 80.2, "source": "paper"}


def test_a_damaged_task_shard_names_the_shard_and_sample_and_the_fix(tmp_path):
    import webdataset as wds

    from flamingo_lab.eval.tasks import read_items

    shard = tmp_path / "test-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        w.write({"__key__": "coco-test-7", "0.png": b"not a png", "json": json.dumps({"id": "7"}).encode()})
    with pytest.raises(ValueError, match=rf"{shard}:coco-test-7 cannot be read \(bad_image.*flamingo-import"):
        read_items([str(shard)], 1)


def test_a_task_shard_cut_short_is_an_error_not_fewer_items(tmp_path):
    """A task shard truncated inside a member header: tarfile alone ends it quietly, so the task would be scored
    on fewer items; reading it raises, naming the shard and the fix."""
    import webdataset as wds

    from flamingo_lab.eval.tasks import read_items

    shard = tmp_path / "test-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i in range(3):
            w.write({"__key__": f"coco-test-{i}", "txt": f"caption {i}".encode(), "json": json.dumps({"id": str(i)}).encode()})
    items = read_items([str(shard)], 0)
    assert [it.id for it in items] == ["0", "1", "2"]
    import tarfile

    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[4].offset + 100  # samples 0 and 1 whole (2 members each), sample 2's header cut
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"a task shard is damaged \({shard} stops after .*flamingo-import"):
        read_items([str(shard)], 0)
    assert [it.id for it in read_items([str(shard)], 0, limit=1)] == ["0"]  # what it reads before the cut is fine

