"""flamingo-import: COCO captions and VQAv2 JSON + an image folder -> task shards the evaluation reads."""

from __future__ import annotations

import json
import tarfile

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
    assert m1["skipped"] == {"bad_image": 1}
    m2 = run({"kind": "vqav2", "questions": str(tmp_path / "q.json"), "annotations": str(tmp_path / "a.json"), **common})
    assert m2["skipped"] == {"missing_image": 2}
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
