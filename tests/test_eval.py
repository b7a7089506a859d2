"""Few-shot evaluation (flamingo_lab.eval): metrics, prompts, fixed shapes, end to end, flamingo-eval."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from flamingo_lab.eval import (
    Item,
    Task,
    build_prompt,
    cider_score,
    load_tasks,
    normalize_answer,
    overall_score,
    read_items,
    roc_auc,
    top1_score,
    vqa_accuracy,
)
from flamingo_lab.eval import metrics as M
from flamingo_lab.eval.harness import bucket, make_batch, tokenize_prompt
from flamingo_lab.eval.prompts import SupportSampler

BIN = Path(sys.executable).parent
DEV = ["coco", "okvqa", "vqav2", "msvdqa", "vatex"]

# ---------------------------------------------------------------- metrics


def test_vqa_normalisation_edge_cases():
    assert normalize_answer("Two") == "2"  # number words -> digits
    assert normalize_answer("none") == "0"
    assert normalize_answer("the red circle") == "red circle"  # articles
    assert normalize_answer("A dog.") == "dog"  # trailing full stop
    assert normalize_answer("yes!") == "yes" and normalize_answer("yes ?") == "yes"
    assert normalize_answer("2.5") == "2.5"  # a decimal point is not punctuation
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("dont") == "don't"  # contractions
    assert normalize_answer("  Red\tcircle \n") == "red circle"
    assert normalize_answer("black-and-white") == "black and white"


def test_vqa_accuracy_partial_agreement():
    humans = ["2"] * 2 + ["two"] + ["three"] * 7
    # "two" == "2": 3 humans. Each 9-subset: a "2"-human's others hold 2 -> 2/3; the 7 others see 3 -> 1.
    assert vqa_accuracy("Two.", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("three", humans) == 1.0
    assert vqa_accuracy("four", humans) == 0.0
    one = ["cat"] + ["dog"] * 9  # a single human agrees: 9 subsets hold it once -> 1/3 each
    assert vqa_accuracy("the cat", one) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("red", ["red"]) == 1.0  # one accepted answer: exact match


def _official_vqa_accuracy(prediction, answers):
    """vqaEval.py (GT-Vision-Lab/VQA) on one question: the prediction fully normalised, the humans' answers
    only stripped of punctuation, and only when they disagree."""
    pred = M._process_digit_article(M._process_punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    gts = [M._process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    accs = [min(1.0, sum(g == pred for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def test_vqa_accuracy_is_the_official_one_on_normalised_answers_and_an_empty_answer_scores_zero():
    """What vqa_accuracy's docstring promises: the official scores wherever the human answers are already
    normalised (as VQAv2's are); more lenient only on unnormalised ones; nothing said is never right."""
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "3", "red", "t shirt", "dog", "2.5", "1000", "don't"]
    preds = ["Yes", "no.", "two", "Three!", "T-shirt", "a dog", "2.5", "1,000", "dont", "", "the", "?", "blue"]
    for _ in range(500):
        answers = [rng.choice(vocab[: rng.randint(1, len(vocab))]) for _ in range(10)]
        pred = rng.choice(preds)
        assert vqa_accuracy(pred, answers) == pytest.approx(_official_vqa_accuracy(pred, answers)), (pred, answers)
    # unnormalised humans (the embedded world's number words): the official script never matches them
    assert vqa_accuracy("2", ["two"] * 10) == 1.0 and _official_vqa_accuracy("2", ["two"] * 10) == 0.0
    # a prediction that normalises to "" scores 0 even where human answers normalise to "" as well
    assert vqa_accuracy("", ["?"] * 4 + ["no"] * 6) == 0.0
    assert vqa_accuracy("the", ["a"] * 4 + ["b"] * 6) == 0.0
    assert vqa_accuracy("", ["the"]) == 0.0


def test_scoring_no_items_is_an_error_not_a_zero():
    """An empty test split would otherwise score 0 and pass for a model that got everything wrong."""
    with pytest.raises(ValueError, match="no test items"):
        M.vqa_score([], [])
    with pytest.raises(ValueError, match="no test items"):
        top1_score([], [])
    with pytest.raises(ValueError, match="no test items"):
        cider_score({}, {})


def test_top1_roc_auc_and_overall():
    assert top1_score(["Red.", "blue", "a circle"], ["red", "green", "circle"]) == pytest.approx(200 / 3)
    assert top1_score(["two", "a man"], ["2", "man"]) == 100.0  # the documented leniency: VQA normalisation
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    assert overall_score({"coco": 71.65, "vqav2": 40.1}, {"coco": 143.3, "vqav2": 80.2}) == pytest.approx(50.0)


def test_overall_without_a_reference_for_a_task_says_so(caplog):
    """A task with no reference (None, or an oracle scoring 0) cannot enter the Overall: it is left out
    loudly, and overall_tasks_used names the tasks the mean is over."""
    refs = {"coco": 143.3, "vqav2": 80.2, "vatex": None, "msvdqa": 0.0}
    with caplog.at_level("WARNING", logger="flamingo_lab.eval.metrics"):
        value = overall_score({"coco": 71.65, "vqav2": 40.1, "vatex": 30.0, "msvdqa": 20.0}, refs)
    assert value == pytest.approx(50.0)  # over coco and vqav2 only
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and "'vatex'" in warned[0] and "'msvdqa'" in warned[1]
    assert M.overall_tasks_used(["coco", "vqav2", "vatex", "msvdqa"], refs) == ["coco", "vqav2"]


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        "1": ["A red circle in the top left.", "there is a red circle.", "a picture of a red circle"],
        "2": ["Two blue squares, left of a green triangle!", "blue squares and a green triangle."],
        "3": ["a small yellow star above a big purple circle.", "a yellow star and a purple circle."],
    }
    preds = {"1": "a red circle.", "2": "two blue squares and a triangle", "3": "A yellow star."}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    expected, _ = Cider().compute_score(gts, res)
    assert cider_score(preds, refs) == pytest.approx(100 * expected)
    assert cider_score(preds, refs) > cider_score({k: "nothing here" for k in preds}, refs)


def test_one_line_joins_at_every_line_break_the_java_tokenizer_splits_at():
    """PTBTokenizer only replaces "\\n" before its Java tokenizer, which also breaks lines at these: a caption
    holding one would shift every later caption onto another item's id (no java needed here)."""
    from flamingo_lab.eval.metrics import one_line

    for sep in ["\r", "\r\n", "\x0b", "\x0c", "\u2028", "\u2029", "\x85", "\n", "\t", "  "]:
        assert one_line(f" a red{sep}circle{sep}") == "a red circle", repr(sep)


def test_cider_a_line_break_in_one_caption_leaves_the_other_items_scores():
    refs = {"1": ["a red circle", "there is a red\u2028circle"], "2": ["a blue square", "there is a blue square"],
            "3": ["a green star", "there is a green star"]}
    clean = {"1": "a red circle", "2": "a blue square", "3": "a green star"}
    score, per_item = M.cider_scores(clean, refs)
    broken_score, broken = M.cider_scores({**clean, "1": "a red\rcircle"}, refs)
    assert broken == pytest.approx(per_item)  # every item scored against its own references
    assert broken_score == pytest.approx(score)
    assert score == pytest.approx(sum(per_item.values()) / 3)  # the corpus score is the items' mean


def test_cider_groups_score_their_items_within_the_whole_test_set():
    """A group's CIDEr is the mean of its items' CIDEr with the whole test set's IDF: a one-item group
    scores its item (as its own corpus it would score 0), and the groups of one key average, weighted by
    their size, to the task's score."""
    from flamingo_lab.eval.harness import breakdown

    refs = [["a red circle in the top left", "there is a red circle", "a picture of a red circle"],
            ["two blue squares left of a green triangle", "blue squares and a green triangle"],
            ["a small yellow star above a big purple circle", "a yellow star and a purple circle"],
            ["a green square", "there is a green square", "a picture of a green square"]]
    preds = ["a red circle", "two blue squares and a triangle", "a yellow star", "a green square"]
    task = Task(name="coco", kind="caption", metric="cider", support=[], test=["unused.tar"])
    items = [Item(id=str(i), images=[], captions=r, meta={"qtype": "caption" if i < 2 else "scene", "held_out": i == 3})
             for i, r in enumerate(refs)]
    score, per_item = M.cider_scores({str(i): p for i, p in enumerate(preds)}, {str(i): r for i, r in enumerate(refs)})
    out = breakdown(task, items, preds)
    assert out["held_out=True"] == {"n": 1, "score": pytest.approx(per_item["3"])}
    assert per_item["3"] > 0
    for key in ("qtype", "held_out"):
        groups = [v for k, v in out.items() if k.startswith(f"{key}=")]
        assert sum(g["n"] * g["score"] for g in groups) / len(items) == pytest.approx(score)


# ---------------------------------------------------------------- a tiny world in the task format

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square")
NUMBERS = ("zero", "one", "two", "three")


def draw(objs, size=32, shift=0):
    img = Image.new("RGB", (size, size), (50, 50, 50))
    d = ImageDraw.Draw(img)
    for i, (shape, colour) in enumerate(objs):
        cx, cy = 8 + 16 * (i % 2) + shift, 8 + 16 * (i // 2)
        box = [cx - 6, cy - 6, cx + 6, cy + 6]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def task_sample(rng, kind, index, frames=1, episode=None, naming=None):
    objs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(rng.randint(1, 3))]
    meta = {"id": f"{kind}-{index}", "question": None, "answers": [], "captions": [], "episode": episode}
    names = " and ".join(f"a {c} {s}" for s, c in objs)
    if kind in ("caption", "video_caption"):
        meta["captions"] = [f"{names}.", f"there is {names}.", f"a picture of {names}."]
    elif kind == "okvqa":
        meta["question"] = f"what colour is the {objs[0][0]}?"
        meta["answers"] = [objs[0][1]] * 8 + ["dark"] * 2
    elif kind == "vqav2":
        meta["question"] = "how many shapes are there?"
        meta["answers"] = [NUMBERS[len(objs)]] * 6 + [str(len(objs))] * 3 + ["many"]
    elif kind == "video_qa":
        meta["question"] = "what shape moves?"
        meta["answers"] = [objs[0][0]]
    elif kind == "renamed":  # in-context: each episode swaps the names of red and blue
        colour = rng.choice(["red", "blue"])
        objs = [(objs[0][0], colour)]
        meta["question"] = f"what colour is the {objs[0][0]}?"
        meta["answers"] = [naming[colour]]
    sample = {"__key__": f"{kind}-{index:05d}", "json": json.dumps(meta).encode()}
    for f in range(frames):
        sample[f"{f}.png"] = png(draw(objs, shift=f))
    return sample


TASK_SPECS = {  # name: (sample kind, manifest kind, metric, frames)
    "coco": ("caption", "caption", "cider", 1),
    "okvqa": ("okvqa", "vqa", "vqa_accuracy", 1),
    "vqav2": ("vqav2", "vqa", "vqa_accuracy", 1),
    "msvdqa": ("video_qa", "video_qa", "top1", 3),
    "vatex": ("video_caption", "video_caption", "cider", 3),
    "renamed_colours": ("renamed", "vqa", "top1", 1),
}


def write_tasks(root: Path, n_support=12, n_test=10, names=None) -> dict:
    """Write task shards under ``root/tasks`` and return the manifest's ``tasks`` entry (relative paths)."""
    rng = random.Random(0)
    tasks = {}
    for name, (kind, mkind, metric, frames) in TASK_SPECS.items():
        if names and name not in names:
            continue
        paths = {}
        for split, n in (("support", n_support), ("test", n_test)):
            rel = f"tasks/{name}-{split}-000000.tar"
            (root / "tasks").mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(root / rel), encoder=False) as w:
                for i in range(n):
                    episode = naming = None
                    if kind == "renamed":
                        episode = i % 2
                        naming = {"red": "red", "blue": "blue"} if episode == 0 else {"red": "blue", "blue": "red"}
                    w.write(task_sample(rng, kind, i + (0 if split == "support" else 1000), frames, episode, naming))
            paths[split] = [rel]
        tasks[name] = {"kind": mkind, "metric": metric, "splits": paths, "frames": frames,
                       "in_context": kind == "renamed"}
        if kind == "renamed":
            tasks[name]["classes"] = ["red", "blue"]
    return tasks


@pytest.fixture(scope="module")
def task_world(tiny_world_dir, tmp_path_factory):
    """The tiny training world plus the six evaluation tasks in the world.json ``tasks`` format."""
    root = tmp_path_factory.mktemp("task_world") / "world"
    shutil.copytree(tiny_world_dir, root)
    manifest = json.loads((root / "world.json").read_text())
    manifest["tasks"] = write_tasks(root)
    (root / "world.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """COCO captions and VQAv2 files (written here) imported by flamingo-import's own code."""
    from flamingo_lab.import_data import run as import_files

    root = tmp_path_factory.mktemp("imported")
    images = root / "img"
    images.mkdir()
    rng = random.Random(0)
    for i in range(1, 13):
        draw([(rng.choice(SHAPES), rng.choice(list(COLOURS)))]).save(
            images / f"COCO_val2014_{i:012d}.jpg")
    captions = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, 13)],
                "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"a red circle number {k}"}
                                for i in range(1, 13) for k in range(5)]}
    questions = {"questions": [{"image_id": i, "question": "what colour is the circle?", "question_id": i}
                               for i in range(1, 13)]}
    answers = {"annotations": [{"question_id": i, "image_id": i, "answers": [{"answer": "red", "answer_id": j}
                                                                             for j in range(1, 11)]}
                               for i in range(1, 13)]}
    for name, content in (("captions.json", captions), ("q.json", questions), ("a.json", answers)):
        (root / name).write_text(json.dumps(content))
    out = root / "real"
    common = dict(images=str(images), out_dir=str(out), n_support=4, n_test=None, seed=0, shard_size=4,
                  image_size=32)
    import_files({"kind": "coco", "captions": str(root / "captions.json"), **common})
    import_files({"kind": "vqav2", "questions": str(root / "q.json"), "annotations": str(root / "a.json"), **common})
    return out


@pytest.fixture(scope="module")
def model(task_world):
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    torch.manual_seed(0)
    return build_flamingo(compose(["scale=tiny", f"data.root={task_world}"]).model).eval()


# ---------------------------------------------------------------- prompts and shapes


def test_tasks_load_from_a_world_and_an_imported_folder(task_world, imported):
    tasks = load_tasks(task_world)
    assert set(DEV) <= set(tasks) and tasks["renamed_colours"].in_context
    assert all(Path(p).is_absolute() and Path(p).is_file() for t in tasks.values() for p in t.test + t.support)
    items = read_items(tasks["msvdqa"].test, tasks["msvdqa"].frames, limit=4)
    assert len(items) == 4 and all(len(it.images) == 3 for it in items) and items[0].answers
    assert set(load_tasks(imported)) == {"coco", "vqav2"}


def test_k_shot_prompt_holds_support_then_query_each_span_sees_its_own_image(task_world, model):
    from flamingo_lab.models.xattn import media_mask

    task = load_tasks(task_world)["vqav2"]
    support = read_items(task.support, 1)
    query = read_items(task.test, 1, limit=1)[0]
    template = "<image>Question: {question} Answer: {answer}<|endofchunk|>"
    k = 4
    shots = SupportSampler(task, support, seed=0).sample(query, k)
    prompt = build_prompt(template, task, shots, query)
    assert [imgs for imgs in prompt.images] == [s.images for s in shots] + [query.images]  # order kept
    ids = tokenize_prompt(model.tokenizer, prompt.text)
    batch = make_batch([(ids, prompt.images)], batch_size=2, length_buckets=[32, 64, 128, 256],
                       image_buckets=[1, 5, 9], frames=1, image_size=32, pad_id=model.tokenizer.pad_token_id)
    assert batch["images"].shape == (2, 5, 1, 3, 32, 32)
    for t, clip in enumerate(prompt.images):  # slot t holds the t-th <image>'s pixels
        from flamingo_lab.data.shards import image_to_tensor

        assert torch.equal(batch["images"][0, t, 0], image_to_tensor(clip[0], 32))
    x = batch["input_ids"][:1]
    t2m = model.text_to_media(x, n_media=5)[0]  # (L,)
    media_pos = (x[0] == model.media_token_id).nonzero().flatten().tolist()
    assert len(media_pos) == k + 1
    eoc = model.eoc_token_id
    for i, p in enumerate(media_pos):  # the span from <image> i to its <|endofchunk|> sees image i only
        end = media_pos[i + 1] if i + 1 < len(media_pos) else x.shape[1]
        assert (t2m[p:end] == i + 1).all()
        if i < k:
            assert x[0, end - 1] == eoc
    allowed = media_mask(t2m[None], 5, 3, "immediate")[0]  # (L, 5*3)
    for i, p in enumerate(media_pos):
        assert allowed[p].view(5, 3)[i].all() and allowed[p].view(5, 3).sum() == 3
    assert (t2m[: media_pos[0]] == 0).all()  # left padding and <s> see no image
    # 0-shot: two text-only examples, then the query's image
    zero = build_prompt(template, task, shots[:2], query, text_only=True)
    assert zero.images == [query.images] and zero.text.count("<image>") == 1
    assert zero.text.index("<image>") > zero.text.index("<|endofchunk|>")


def test_implicit_question_zero_shot_is_the_query_alone_and_shots_say_what_is_asked(tiny_world_dir, model):
    """implicit_question's manifest fixes its 0-shot prompt to the query alone: the paper's two text-only examples
    ("Answer: red") would name the kind of answer its shots are there to give. Other tasks keep the paper's."""
    from flamingo_lab.config import compose
    from flamingo_lab.data.world import CELL_NAMES
    from flamingo_lab.eval.harness import TaskEvaluator
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={tiny_world_dir}"]).eval, resolve=True)
    tasks = load_tasks(tiny_world_dir)
    task = tasks["implicit_question"]
    assert task.in_context and task.zero_shot_text_examples == 0 and tasks["vqav2"].zero_shot_text_examples is None
    ev = TaskEvaluator(model, task, cfg, progress=False)
    zero = ev.prompts(0)
    assert zero and all(p.text == "<image>Answer:" and p.images == [p.query.images] for p in zero)
    values = {"colour": ["red", "green", "blue", "yellow", "purple"], "shape": ["circle", "square", "triangle", "star"],
              "position": list(CELL_NAMES)}
    for p in ev.prompts(4):  # four shots of the query's episode: their answers are of the kind the query asks
        assert p.text.count("<image>") == 5 and "Question" not in p.text and p.text.endswith("<image>Answer:")
        assert set(p.shown) <= set(values[p.query.meta["qtype"]]) and len(p.shown) == 4
        assert all(f"<image>Answer: {a}<|endofchunk|>" in p.text for a in p.shown)
    for p in TaskEvaluator(model, tasks["renamed_colours"], cfg, progress=False).prompts(0):
        assert p.text.count("Answer:") == 3 and p.text.count("<image>") == 1  # two text-only examples, the query


def test_batches_use_fixed_bucketed_shapes():
    assert [bucket(n, [32, 64, 128]) for n in (1, 32, 33, 128, 129, 300)] == [32, 32, 64, 128, 256, 384]
    img = Image.new("RGB", (32, 32))
    shapes = set()
    for n_tok in (5, 17, 30):
        b = make_batch([([1] * n_tok, [[img]] * 3)], batch_size=4, length_buckets=[32, 64], image_buckets=[1, 5],
                       frames=1, image_size=32, pad_id=0)
        shapes.add((tuple(b["input_ids"].shape), tuple(b["images"].shape)))
        assert b["n_real"] == 1 and b["attention_mask"][0, -n_tok:].all() and not b["attention_mask"][0, :-n_tok].any()
    assert shapes == {((4, 32), (4, 5, 1, 3, 32, 32))}


def test_support_sampling_seeded_episodic_and_rices():
    task = Task("t", "vqa", "vqa_accuracy", support=["x"], test=["x"], in_context=True)
    support = [Item(id=str(i), images=[], answers=["a"], episode=i % 3) for i in range(30)]
    query = Item(id="q", images=[], episode=1)
    s = SupportSampler(task, support, seed=0)
    first = [x.id for x in s.sample(query, 4)]
    assert first == [x.id for x in SupportSampler(task, support, seed=0).sample(query, 4)]  # fixed seed
    assert all(x.episode == 1 for x in s.sample(query, 8))  # in-context: the query's episode only
    feats = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    rices = SupportSampler(task, support, method="rices", features=feats)
    qf = feats[4] + 0.01 * feats[7]  # nearest: item 4 (episode 1)
    chosen = rices.sample(query, 3, qf)
    assert chosen[-1].id == "4" and all(x.episode == 1 for x in chosen)  # the nearest stands last


# ---------------------------------------------------------------- end to end


def test_untrained_model_evaluates_every_task_with_rank_and_rices(task_world, model, tmp_path):
    from flamingo_lab.config import compose
    from flamingo_lab.eval import evaluate_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={task_world}",
                                          "+eval.task_max_items.renamed_colours=6"]).eval, resolve=True)
    assert cfg["task_max_items"] == {"renamed_colours": 6}  # the override syntax conf/eval/default.yaml names
    cfg.update(max_items=4, shots=[0, 2], support="rices", batch_size=4,
               task_decoding={"renamed_colours": {"mode": "rank"}})
    res = evaluate_model(model, task_world, cfg, out_dir=tmp_path, progress=False)
    assert set(res["scores"]) == set(DEV) | {"renamed_colours"}
    assert res["scores"]["vqav2"]["2"]["n"] == 4 and res["scores"]["renamed_colours"]["2"]["n"] == 6
    # the in-context task says how much of its score repeating a shown answer explains
    ic = res["scores"]["renamed_colours"]["2"]
    assert set(ic["in_context"]) == {"guess_shown", "copied", "in_episode"}
    assert 0 <= ic["in_context"]["guess_shown"] <= 100 and ic["in_context"]["copied"] <= ic["in_context"]["in_episode"]
    shown = [g for g in ic["breakdown"] if g.startswith("answer_shown=")]
    assert shown and sum(ic["breakdown"][g]["n"] for g in shown) == 6
    assert "in_context" not in res["scores"]["vqav2"]["2"]
    assert "eval/renamed_colours_roc_auc_2shot" in res["metrics"]
    assert all(r["source"] == "oracle" for r in res["references"].values())  # an embedded world
    assert res["oracle"]["vqav2"] == pytest.approx(100.0) and res["oracle"]["coco"] > 0
    assert (tmp_path / "predictions" / "coco_2shot.json").is_file()


def test_overall_records_the_tasks_it_averages_and_leaves_out_one_without_a_reference(task_world, model, caplog):
    """One vatex item: CIDEr over one item is 0 for any caption (its IDF is log 1), so the oracle reference is
    None and the Overall can only be vqav2's; the results and the table say so."""
    from flamingo_lab.config import compose
    from flamingo_lab.eval import evaluate_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={task_world}"]).eval, resolve=True)
    cfg.update(tasks=["vqav2", "vatex"], max_items=2, task_max_items={"vatex": 1}, shots=[0], batch_size=2,
               controls=[], overall_tasks=["vqav2", "vatex"])
    with caplog.at_level("WARNING", logger="flamingo_lab.eval.metrics"):
        res = evaluate_model(model, task_world, cfg, progress=False)
    assert res["references"]["vatex"]["value"] is None and res["overall_tasks"] == ["vqav2", "vatex"]
    assert res["overall_tasks_used"] == ["vqav2"]
    assert res["overall"]["0"] == pytest.approx(100 * res["scores"]["vqav2"]["0"]["score"]
                                               / res["references"]["vqav2"]["value"])
    assert any("'vatex'" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "over vqav2; left out (no reference): vatex" in res["table"]


def test_fewer_support_items_than_shots_are_reported_not_hidden(task_world, tiny_world_dir, model, caplog):
    """With 2 support items a 4-shot prompt can show only 2 (the query is never its own shot): the result
    records the shots its prompts had, and a warning says how to get k."""
    import logging

    from flamingo_lab.config import compose
    from flamingo_lab.eval.harness import TaskEvaluator
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={task_world}"]).eval, resolve=True)
    task = load_tasks(task_world)["vqav2"]
    full = TaskEvaluator(model, task, {**cfg, "max_items": 2}, progress=False).run(2)
    assert full["shots_used"] == {"min": 2, "max": 2, "short": 0}
    with caplog.at_level(logging.WARNING):
        short = TaskEvaluator(model, task, {**cfg, "max_items": 2, "max_support": 2}, progress=False).run(4)
    assert short["shots_used"] == {"min": 2, "max": 2, "short": 2}
    assert "2 of 2 prompts have fewer than 4 shots" in caplog.text and "eval.max_support" in caplog.text
    assert "shots_used" not in TaskEvaluator(model, task, {**cfg, "max_items": 2}, progress=False).run(0)
    # the text control's prompts hold no images (each is its scene's words), but their shots are there
    caplog.clear()
    scenes = load_tasks(tiny_world_dir)["vqav2"]  # the embedded world's own tasks: items with their scenes
    with caplog.at_level(logging.WARNING):
        control = TaskEvaluator(model, scenes, {**cfg, "max_items": 2}, progress=False).run(2, control="text")
    assert control["shots_used"] == {"min": 2, "max": 2, "short": 0}
    assert "fewer than" not in caplog.text


def test_a_task_without_test_items_is_an_error_that_names_it(task_world, model):
    from flamingo_lab.config import compose
    from flamingo_lab.eval.harness import TaskEvaluator
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={task_world}"]).eval, resolve=True)
    with pytest.raises(ValueError, match="task 'vqav2' has no test items.*eval.max_items"):
        TaskEvaluator(model, load_tasks(task_world)["vqav2"], {**cfg, "max_items": 0}, progress=False)


def test_tiny_trained_model_end_to_end_and_flamingo_eval_cli(task_world, imported, tmp_path):
    """Train a few steps (evaluation at the end: all five tasks at k = 0 and 4), then flamingo-eval
    the checkpoint on an imported-format folder (paper references)."""
    from flamingo_lab.config import compose
    from flamingo_lab.training.run import train

    run_dir = tmp_path / "run"
    cfg = compose(["scale=tiny", f"data.root={task_world}", "trainer.max_steps=8", "logger=none",
                   "eval.max_items=6", "eval.shots=[0,4]", "eval.batch_size=8"])
    results = train(cfg, run_dir)
    on_disk = json.loads((run_dir / "results.json").read_text())
    for task, metric in (("coco", "cider"), ("okvqa", "vqa_accuracy"), ("vqav2", "vqa_accuracy"),
                         ("msvdqa", "top1"), ("vatex", "cider")):
        for k in (0, 4):
            value = on_disk["metrics"][f"eval/{task}_{metric}_{k}shot"]
            assert 0.0 <= value and value == results["eval"]["scores"][task][str(k)]["score"]
    assert "eval/overall" in on_disk["metrics"] and on_disk["eval"]["overall_shots"] == 4
    assert on_disk["eval"]["scores"]["coco"]["4"]["n"] == 6
    assert on_disk["eval"]["wall_time_s"] < 300

    out = tmp_path / "eval_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [str(BIN / "flamingo-eval"), f"checkpoint={run_dir}", f"data_root={imported}", "eval.shots=[0,2]",
         "eval.max_items=4", "progress=false", f"hydra.run.dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Overall" in proc.stdout and "coco" in proc.stdout
    content = json.loads((out / "results.json").read_text())
    assert set(content["eval"]["scores"]) == {"coco", "vqav2"}
    assert content["eval"]["references"]["coco"] == {"value": 143.3, "source": "paper"}
    assert "eval/overall" in content["metrics"] and "eval/vqav2_vqa_accuracy_2shot" in content["metrics"]


def test_breakdown_per_question_type_and_held_out_with_majority_and_chance():
    from flamingo_lab.eval.harness import breakdown
    from flamingo_lab.eval.tasks import Item, Task

    task = Task(name="t", kind="vqa", metric="top1", support=[], test=["unused.tar"])
    items = [Item(id=str(i), images=[], question="q", answers=[a], meta={"qtype": q, "held_out": h})
             for i, (a, q, h) in enumerate([("red", "colour", True), ("blue", "colour", False),
                                            ("red", "colour", False), ("two", "count", True)])]
    preds = ["red", "blue", "blue", "one"]
    out = breakdown(task, items, preds)
    assert out["qtype=colour"]["n"] == 3
    assert out["qtype=colour"]["score"] == pytest.approx(200 / 3)
    assert out["qtype=colour"]["majority"] == pytest.approx(200 / 3)  # always "red": 2 of 3
    assert out["qtype=colour"]["chance"] == pytest.approx(50.0)  # "red" 2/3 or "blue" 1/3, either at random
    assert out["qtype=count"] == {"n": 1, "score": 0.0, "majority": 100.0, "chance": 100.0}
    assert out["held_out=True"]["score"] == pytest.approx(50.0) and out["held_out=False"]["n"] == 2
    assert not any(k.startswith("objects=") for k in out)  # items without a scene: no such groups


def test_breakdown_chance_counts_answers_the_metric_equates_as_one_class():
    """"two" and "2" score alike, so guessing among a group's answers is a guess between two answers, not three."""
    from flamingo_lab.eval.harness import breakdown

    task = Task(name="v", kind="vqa", metric="vqa_accuracy", support=[], test=["unused.tar"])
    items = [Item(id=str(i), images=[], question="q", answers=[a] * 10, meta={"qtype": "count"})
             for i, a in enumerate(["two", "2", "three"])]
    out = breakdown(task, items, ["2", "2", "3"])["qtype=count"]
    assert out["majority"] == pytest.approx(200 / 3)  # always "2": two of three
    assert out["chance"] == pytest.approx(50.0)  # "2" (2/3) or "3" (1/3), either at random


def test_breakdown_by_objects_in_the_scene_per_question_type():
    """Where a question type's scenes hold different numbers of objects, its score per number: finding the
    named object among several (binding) is told from reading one object's attribute."""
    from flamingo_lab.eval.harness import breakdown
    from flamingo_lab.eval.tasks import Item, Task

    def item(i, answer, qtype, n):
        return Item(id=str(i), images=[], question="q", answers=[answer],
                    meta={"qtype": qtype, "held_out": False, "scene": {"objects": [{"cell": c} for c in range(n)]}})

    task = Task(name="t", kind="vqa", metric="top1", support=[], test=["unused.tar"])
    items = [item(0, "top left", "position", 1), item(1, "top right", "position", 1),
             item(2, "top left", "position", 3), item(3, "bottom left", "position", 2),
             item(4, "red", "colour", 1), item(5, "blue", "colour", 1)]
    preds = ["top left", "top right", "bottom left", "top left", "red", "red"]
    out = breakdown(task, items, preds)
    assert out["objects=position, 1 object"]["score"] == 100.0 and out["objects=position, 1 object"]["n"] == 2
    assert out["objects=position, 2 objects"]["score"] == 0.0 and out["objects=position, 3 objects"]["score"] == 0.0
    assert out["qtype=position"]["score"] == 50.0
    assert not any(k.startswith("objects=colour") for k in out)  # every colour scene has one object: no split
    captions = Task(name="c", kind="caption", metric="cider", support=[], test=["unused.tar"])
    assert not any(k.startswith("objects=") for k in breakdown(captions, [
        Item(id="0", images=[], captions=["a red circle."], meta={"qtype": "caption", "scene": {"objects": [{}]}}),
        Item(id="1", images=[], captions=["two shapes."], meta={"qtype": "caption", "scene": {"objects": [{}, {}]}}),
    ], ["a red circle.", "two shapes."]))


def test_in_context_breakdown_separates_binding_from_repeating_a_shown_answer():
    """A model that repeats the first shown answer scores where that happens to be right; the floor a
    random shown answer reaches (guess_shown) is what the task's score must beat to show binding."""
    from flamingo_lab.eval.harness import shown_breakdown
    from flamingo_lab.eval.prompts import Prompt

    task = Task(name="t", kind="vqa", metric="top1", support=[], test=["unused.tar"], in_context=True)
    item = lambda a: Item(id=a, images=[], question="q", answers=[a])  # noqa: E731
    prompts = [Prompt("", [], item("dax"), ("dax", "wug", "wug", "fep")),   # shown among 3 distinct: 1/3
               Prompt("", [], item("wug"), ("dax", "wug", "dax", "dax")),   # among 2: 1/2
               Prompt("", [], item("zib"), ("dax", "wug", "fep", "fep"))]   # not shown: 0
    groups, summary = shown_breakdown(task, prompts, ["dax", "dax", "dax"])
    assert groups["answer_shown=True"]["n"] == 2 and groups["answer_shown=True"]["score"] == 50.0
    assert groups["answer_shown=True"]["guess_shown"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert groups["answer_shown=False"] == {"n": 1, "score": 0.0}
    assert summary["guess_shown"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 3)
    assert summary["copied"] == 100.0
    groups, summary = shown_breakdown(task, prompts, ["dax", "wug", "zib"])  # binds every time
    assert groups["answer_shown=True"]["score"] == 100.0 and groups["answer_shown=False"]["score"] == 100.0
    assert summary["copied"] == pytest.approx(200 / 3) and "in_episode" not in summary
    # in_episode: answers of the kind the episode asks (implicit_question), right or wrong, shown or not
    for i, p in enumerate(prompts):
        p.query.episode = i % 2
    episodes = {0: {"dax", "wug", "zib", "fep"}, 1: {"red", "blue"}}
    _, summary = shown_breakdown(task, prompts, ["zib", "red", "wug"], episodes)
    assert summary["in_episode"] == 100.0 and summary["copied"] == pytest.approx(100 / 3)
    _, summary = shown_breakdown(task, prompts, ["red", "dax", "top left"], episodes)
    assert summary["in_episode"] == 0.0
    # an answer the score counts as a shown one ("Dax.", "the wug") is a copy of it, and one of its episode's answers
    groups, summary = shown_breakdown(task, prompts, ["Dax.", "the wug", "DAX"], episodes)
    assert groups["answer_shown=True"]["score"] == 100.0
    assert summary["copied"] == 100.0 and summary["in_episode"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------- the text-description control


def test_text_control_puts_each_scenes_words_where_its_image_stood(tiny_world_dir, imported, tmp_path):
    """eval.controls=[text]: every <image> becomes the words for that image (the caption the world
    wrote for it), the prompt has no image, the scores land beside the image scores; imported files
    (no scene metadata) are skipped with the reason."""
    from flamingo_lab.config import compose
    from flamingo_lab.data.world import scene_text
    from flamingo_lab.eval import evaluate_model
    from flamingo_lab.models import build_flamingo
    from omegaconf import OmegaConf

    tasks = load_tasks(tiny_world_dir)
    for name in ("coco", "vatex"):  # a still and a clip: the words are the world's own first caption
        items = read_items(tasks[name].test, tasks[name].frames, limit=5)
        assert [scene_text(it.meta["scene"]) for it in items] == [it.captions[0] for it in items]
    task = tasks["vqav2"]
    support = read_items(task.support, task.frames, limit=2)
    query = read_items(task.test, task.frames, limit=1)[0]
    template = "<image>Question: {question} Answer: {answer}<|endofchunk|>"
    p = build_prompt(template, task, support, query, describe=True)
    assert "<image>" not in p.text and p.images == []
    assert p.text.endswith(f"{scene_text(query.meta['scene'])} Question: {query.question} Answer:")
    assert p.text.startswith(f"{scene_text(support[0].meta['scene'])} Question: {support[0].question}")
    plain = build_prompt(template, task, support, query)
    assert plain.text.count("<image>") == 3 and len(plain.images) == 3

    torch.manual_seed(0)
    model = build_flamingo(compose(["scale=tiny", f"data.root={tiny_world_dir}"]).model).eval()
    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={tiny_world_dir}"]).eval, resolve=True)
    cfg.update(max_items=4, shots=[0, 2], batch_size=4, tasks=["vqav2", "msvdqa"], controls=["text"])
    res = evaluate_model(model, tiny_world_dir, cfg, progress=False)
    for t in ("vqav2", "msvdqa"):
        ctl = res["controls"]["text"][t]
        assert set(ctl) == {"0", "2"} and ctl["2"]["n"] == 4 and "breakdown" in ctl["2"]
        assert f"eval_text/{t}_{ctl['2']['metric']}_2shot" in res["metrics"]
    cfg.update(tasks=None)
    res = evaluate_model(model, imported, cfg, progress=False)
    assert all("skipped" in v for v in res["controls"]["text"].values()) and res["scores"]["vqav2"]["2"]["n"] == 4
    with pytest.raises(ValueError, match="control must be 'text'"):
        from flamingo_lab.eval.harness import TaskEvaluator
        TaskEvaluator(model, task, {**cfg, "max_items": 1}, progress=False).prompts(2, control="audio")
