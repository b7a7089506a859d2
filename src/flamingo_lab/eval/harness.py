"""The few-shot harness: tasks x shots -> prompts -> fixed-shape batches -> decoding -> metrics -> Overall.

``evaluate_model(model, root, cfg)`` is what ``flamingo-eval`` and the end of a training run call;
``cfg`` is the ``eval`` config node (conf/eval/default.yaml) as a dict.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from flamingo_lab.data.shards import image_to_tensor
from flamingo_lab.data.tokenizer import EOC_TOKEN
from flamingo_lab.models.generation import continuation_logprobs, generate

from . import metrics as M
from .prompts import Prompt, SupportSampler, build_prompt, has_scene, target_text, templates_for, vision_features
from .tasks import Item, Task, is_embedded_world, load_tasks, read_items

log = logging.getLogger(__name__)

PAPER_REFERENCES = {"coco": 143.3, "okvqa": 54.4, "vqav2": 80.2, "msvdqa": 47.9, "vatex": 76.3}
DEV_TASKS = tuple(PAPER_REFERENCES)


# ---------------------------------------------------------------- fixed shapes


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (beyond the largest: the next multiple of it)."""
    for b in sorted(buckets):
        if n <= b:
            return b
    top = max(buckets)
    return top * math.ceil(n / top)


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def make_batch(rows: Sequence[tuple[list[int], list[list]]], *, batch_size: int, length_buckets: Sequence[int],
               image_buckets: Sequence[int], frames: int, image_size: int, pad_id: int,
               extra_masks: Sequence[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Left-pad ``rows`` (token ids, images per ``<image>``) to a bucketed shape and a fixed batch size.

    Returns ``input_ids``/``attention_mask`` ``(batch_size, L_bucket)``, ``images``
    ``(batch_size, T_bucket, F, C, H, W)``, ``n_real`` (rows beyond it repeat the last one) and, when
    ``extra_masks`` is given, ``continuation_mask`` aligned like ``input_ids``.
    """
    if not rows:
        raise ValueError("an empty batch")
    n_real = len(rows)
    rows = list(rows) + [rows[-1]] * (batch_size - n_real)
    masks = list(extra_masks) + [extra_masks[-1]] * (batch_size - n_real) if extra_masks is not None else None
    L = bucket(max(len(ids) for ids, _ in rows), length_buckets)
    T = bucket(max(max(len(imgs) for _, imgs in rows), 1), image_buckets)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
    cont = torch.zeros((len(rows), L), dtype=torch.long)
    images = torch.zeros(len(rows), T, frames, 3, image_size, image_size)  # (B, T_img, F, C, H, W)
    for r, (ids, imgs) in enumerate(rows):
        input_ids[r, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, L - len(ids):] = 1
        if masks is not None:
            cont[r, L - len(ids):] = torch.tensor(masks[r], dtype=torch.long)
        for t, clip in enumerate(imgs):
            for f, frame in enumerate(clip):
                images[r, t, f] = image_to_tensor(frame, image_size)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "images": images, "n_real": n_real}
    if masks is not None:
        out["continuation_mask"] = cont
    return out


# ---------------------------------------------------------------- one task at one k


def _decoding(cfg: Mapping, task: Task) -> dict:
    dec = dict(cfg["decoding"].get(task.kind, {}))
    dec.update(cfg.get("task_decoding", {}).get(task.name, {}) or {})
    return dec


def _classes(task: Task, support: list[Item], test: list[Item]) -> list[str]:
    if task.classes:
        return list(task.classes)
    seen: dict[str, None] = {}
    for it in support + test:
        seen.setdefault(target_text(task, it), None)
    return list(seen)


def _score(task: Task, items: list[Item], preds: list[str]) -> float:
    if task.metric == "cider":
        return M.cider_score({str(i): p for i, p in enumerate(preds)}, {str(i): it.captions for i, it in enumerate(items)})
    if task.metric == "vqa_accuracy":
        return M.vqa_score(preds, [it.answers for it in items])
    return M.top1_score(preds, [it.answers[0] for it in items])


def _group_scorer(task: Task, items: list[Item], preds: list[str]):
    """``score(idx)``: the task's metric on the items ``idx``, in the units of the task's score.

    CIDEr is computed once over all the items and a group gets the mean of its items' scores: its IDF
    must come from the whole test set, as the task's score does (a group scored as its own corpus weighs
    a word by the group alone: one item always scores 0, a word in all the group's references counts for
    nothing). VQA accuracy and top-1 are per item already, so a group is scored on its own items.
    """
    if task.metric == "cider":
        _, per_item = M.cider_scores({str(i): p for i, p in enumerate(preds)},
                                     {str(i): it.captions for i, it in enumerate(items)})
        return lambda idx: float(np.mean([per_item[str(i)] for i in idx]))
    return lambda idx: _score(task, [items[i] for i in idx], [preds[i] for i in idx])


def _objects_group(item: Item) -> str | None:
    """``"<qtype>, <n> objects"`` from the item's scene metadata (the world's tasks carry it), else None."""
    scene, qtype = item.meta.get("scene"), item.meta.get("qtype")
    objects = scene.get("objects") if isinstance(scene, Mapping) else None
    if qtype is None or not isinstance(objects, list) or not objects:
        return None
    return f"{qtype}, {len(objects)} object{'s' if len(objects) > 1 else ''}"


def breakdown(task: Task, items: list[Item], preds: list[str], keys=("qtype", "held_out", "objects")) -> dict:
    """The task's metric per value of each item field in ``keys`` (e.g. per question type, and on
    held-out attribute combinations vs seen ones), with the item count, the majority-answer baseline and
    chance (the mean score of always giving one of the group's answers, over its distinct answers as the
    metric normalises them: a uniform guess among them). A CIDEr group scores the mean of its items' CIDEr
    within the whole test set (``_group_scorer``). ``objects`` groups each question type by the number of
    objects in its scene (where items carry their scene and a type's scenes differ in it): a question about
    one object of several needs the model to find that object first, so this tells binding from reading an
    attribute."""
    groups: dict[str, list[int]] = {}  # "key=value" -> the indices of its items
    for key in keys:
        if key == "objects":
            if task.metric == "cider":
                continue
            values_of = {i: _objects_group(it) for i, it in enumerate(items)}
            counts: dict[str, set] = {}
            for v in filter(None, values_of.values()):
                counts.setdefault(v.split(", ")[0], set()).add(v)
            values_of = {i: v for i, v in values_of.items() if v and len(counts[v.split(", ")[0]]) > 1}
        else:
            values_of = {i: str(it.meta[key]) for i, it in enumerate(items) if key in it.meta}
        for value in sorted(set(values_of.values())):
            groups[f"{key}={value}"] = [i for i, v in values_of.items() if v == value]
    score = _group_scorer(task, items, preds) if groups else None
    out: dict[str, dict] = {}
    for name, idx in groups.items():
        entry = {"n": len(idx), "score": score(idx)}
        if task.metric != "cider":  # what always giving the most common answer of this group scores
            sub_items = [items[i] for i in idx]
            # one class per answer the metric tells apart ("two" and "2" are one): the uniform guess is over those
            classes: dict[str, str] = {}
            for t in sorted(set(target_text(task, it) for it in sub_items)):
                classes.setdefault(M.normalize_answer(t), t)
            per_class = [_score(task, sub_items, [c] * len(sub_items)) for c in classes.values()]
            entry["majority"] = max(per_class)
            entry["chance"] = sum(per_class) / len(per_class)
        out[name] = entry
    return out


def shown_breakdown(task: Task, prompts: list[Prompt], preds: list[str],
                    episode_answers: Mapping[Any, set] | None = None) -> tuple[dict, dict]:
    """For an in-context task: ``(groups, summary)``. ``groups``: the score where the query's answer was
    among the shots' answers and where it was not; the first with ``guess_shown``, what copying a shown
    answer at random scores there (per prompt, one over the number of distinct answers shown). A model
    that only repeats some answer it was shown reaches that floor and no more; binding each answer to
    what its example shows lifts the score above it. ``summary``: that floor over every prompt
    (``guess_shown``, comparable with the task's score) and the share of predictions that repeat a shown
    answer (``copied``). With ``episode_answers`` (episode -> every answer its support items give), also the
    share of predictions that are one of the query's episode's answers (``in_episode``): for
    implicit_question, an answer of the kind asked (right or wrong); for renamed_colours, one of the
    episode's fresh words."""
    # answers compared as the score compares them: "Red" and "red." repeat a shown "red"
    norm = M.normalize_answer
    target = [norm(target_text(task, p.query)) for p in prompts]
    shown = [{norm(a) for a in p.shown} for p in prompts]
    pred = [norm(pr) for pr in preds]
    score = _group_scorer(task, [p.query for p in prompts], preds)
    groups: dict[str, dict] = {}
    for value in (True, False):
        idx = [i for i in range(len(prompts)) if (target[i] in shown[i]) == value]
        if not idx:
            continue
        entry = {"n": len(idx), "score": score(idx)}
        if value:
            entry["guess_shown"] = 100.0 * sum(1 / len(shown[i]) for i in idx) / len(idx)
        groups[f"answer_shown={value}"] = entry
    n = max(len(prompts), 1)
    summary = {
        "guess_shown": 100.0 * sum((target[i] in shown[i]) / len(shown[i])
                                   for i in range(len(prompts)) if shown[i]) / n,
        "copied": 100.0 * sum(pred[i] in shown[i] for i in range(len(prompts))) / n,
    }
    if episode_answers is not None:
        episodes = {e: {norm(a) for a in answers} for e, answers in episode_answers.items()}
        summary["in_episode"] = 100.0 * sum(pred[i] in episodes.get(p.query.episode, ())
                                            for i, p in enumerate(prompts)) / n
    return groups, summary


def oracle_score(task: Task, items: list[Item]) -> float:
    """The score of an oracle that answers with the ground truth (first caption / most common human
    answer / the accepted answer) on the same items through the same metric: the ceiling."""
    return _score(task, items, [target_text(task, it) for it in items])


class TaskEvaluator:
    """Evaluates one task at any k with one model (support features computed once)."""

    def __init__(self, model, task: Task, cfg: Mapping, *, progress: bool = True):
        self.model, self.task, self.cfg, self.progress = model, task, cfg, progress
        self.tokenizer = model.tokenizer
        self.image_size = int(model.cfg.vision.image_size)
        self.device = next(model.parameters()).device
        per_task = (cfg.get("task_max_items") or {}).get(task.name)  # a cheap or noisy task may read more
        self.test = read_items(task.test, task.frames, per_task if per_task is not None else cfg.get("max_items"))
        if not self.test:
            raise ValueError(f"task {task.name!r} has no test items: check that its test shards {task.test} hold "
                             f"samples and that eval.max_items (or eval.task_max_items.{task.name}) is at least 1")
        self.support = read_items(task.support, task.frames, cfg.get("max_support")) if task.support else []
        self.template = templates_for(cfg["prompts"], task)
        self.decoding = _decoding(cfg, task)
        method = cfg.get("support", "random")
        feats = None
        if method == "rices" and self.support:
            feats = vision_features(model, self.support, self.image_size)
            self.query_features = vision_features(model, self.test, self.image_size)
        self.sampler = SupportSampler(task, self.support, method=method, seed=int(cfg.get("seed", 0)), features=feats)

    def prompts(self, k: int, control: str | None = None) -> list[Prompt]:
        """The k-shot prompts; ``control="text"``: each image replaced by its scene's description."""
        if control not in (None, "text"):
            raise ValueError(f"eval control must be 'text' (the scene's description in place of the image); got {control!r}")
        describe = control == "text"
        out = []
        for i, q in enumerate(self.test):
            qf = self.query_features[i] if self.sampler.method == "rices" and self.support else None
            if k == 0:  # the paper's 0-shot: two text-only examples, then the query
                n_text = self.task.zero_shot_text_examples  # the task's own (implicit_question: the query alone)
                n_text = int(self.cfg.get("zero_shot_text_examples", 2) if n_text is None else n_text)
                shots = self.sampler.sample(q, n_text, None)
                out.append(build_prompt(self.template, self.task, shots, q, text_only=True, describe=describe))
            else:
                shots = self.sampler.sample(q, k, qf)
                out.append(build_prompt(self.template, self.task, shots, q, describe=describe))
        return out

    def _batch(self, rows, masks=None):
        b = make_batch(rows, batch_size=int(self.cfg["batch_size"]), length_buckets=self.cfg["buckets"]["length"],
                       image_buckets=self.cfg["buckets"]["images"], frames=self.task.frames,
                       image_size=self.image_size, pad_id=self.tokenizer.pad_token_id, extra_masks=masks)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def _chunks(self, n_rows: int, lengths: list[int]):
        order = sorted(range(n_rows), key=lambda i: lengths[i])  # similar lengths together: fewer buckets
        bs = int(self.cfg["batch_size"])
        return [order[i:i + bs] for i in range(0, n_rows, bs)]

    def generate_answers(self, prompts: list[Prompt], desc: str) -> list[str]:
        ids = [tokenize_prompt(self.tokenizer, p.text) for p in prompts]
        preds: list[str] = [""] * len(prompts)
        eoc = self.model.eoc_token_id
        for chunk in tqdm(self._chunks(len(prompts), [len(x) for x in ids]), desc=desc, disable=not self.progress,
                          leave=False):
            batch = self._batch([(ids[i], prompts[i].images) for i in chunk])
            out = generate(self.model, batch["input_ids"], images=batch["images"],
                           attention_mask=batch["attention_mask"],
                           max_new_tokens=int(self.decoding.get("max_new_tokens", 20)),
                           num_beams=int(self.decoding.get("num_beams", 1)),
                           length_penalty=float(self.decoding.get("length_penalty", 1.0)))
            new = out[:, batch["input_ids"].shape[1]:]
            for r, i in enumerate(chunk):
                toks = new[r].tolist()
                toks = toks[: toks.index(eoc)] if eoc in toks else toks
                preds[i] = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return preds

    def rank_classes(self, prompts: list[Prompt], classes: list[str], desc: str) -> tuple[list[str], list[list[float]]]:
        """Each prompt's classes by log p(class name + <|endofchunk|> | prompt)."""
        ids = [tokenize_prompt(self.tokenizer, p.text) for p in prompts]
        conts = [list(self.tokenizer(" " + c + EOC_TOKEN, add_special_tokens=False)["input_ids"]) for c in classes]
        rows = [(i, c) for i in range(len(prompts)) for c in range(len(classes))]
        lengths = [len(ids[i]) + len(conts[c]) for i, c in rows]
        logp = torch.zeros(len(prompts), len(classes))
        for chunk in tqdm(self._chunks(len(rows), lengths), desc=desc, disable=not self.progress, leave=False):
            batch_rows, masks = [], []
            for j in chunk:
                i, c = rows[j]
                batch_rows.append((ids[i] + conts[c], prompts[i].images))
                masks.append([0] * len(ids[i]) + [1] * len(conts[c]))
            batch = self._batch(batch_rows, masks)
            lp = continuation_logprobs(self.model, batch["input_ids"], batch["attention_mask"],
                                       batch["continuation_mask"], images=batch["images"])
            for r, j in enumerate(chunk):
                i, c = rows[j]
                logp[i, c] = lp[r].item()
        best = logp.argmax(-1).tolist()
        return [classes[b] for b in best], logp.tolist()

    def run(self, k: int, control: str | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        prompts = self.prompts(k, control)
        desc = f"{self.task.name} {k}-shot" + (f" ({control} control)" if control else "")
        out: dict[str, Any] = {"metric": self.task.metric, "n": len(prompts)}
        if k > 0:  # a support pool smaller than k gives shorter prompts: say so, never report them as k-shot silently
            used = [len(p.shown) for p in prompts]  # the shots' answers (the text control's prompts hold no images)
            out["shots_used"] = {"min": min(used), "max": max(used), "short": sum(u < k for u in used)}
            if out["shots_used"]["short"]:
                log.warning("%s: %d of %d prompts have fewer than %d shots (as few as %d): the support pool%s is "
                            "smaller than k; raise eval.max_support or give the task more support items",
                            desc, out["shots_used"]["short"], len(prompts), k, out["shots_used"]["min"],
                            " of the query's episode" if self.task.in_context else "")
        if self.decoding.get("mode", "generate") == "rank":
            classes = _classes(self.task, self.support, self.test)
            preds, logp = self.rank_classes(prompts, classes, desc)
            if len(classes) == 2:  # binary: ROC-AUC from the class probabilities
                labels = [int(target_text(self.task, it) == classes[1]) for it in self.test]
                p1 = [torch.softmax(torch.tensor(row), -1)[1].item() for row in logp]
                out["roc_auc"] = M.roc_auc(labels, p1)
        else:
            preds = self.generate_answers(prompts, desc)
        out["score"] = _score(self.task, self.test, preds)
        out["breakdown"] = breakdown(self.task, self.test, preds)
        if self.task.in_context:
            episode_answers: dict[Any, set] = {}
            for sup in self.support:
                episode_answers.setdefault(sup.episode, set()).add(target_text(self.task, sup))
            groups, out["in_context"] = shown_breakdown(self.task, prompts, preds, episode_answers)
            out["breakdown"].update(groups)
        out["seconds"] = time.perf_counter() - started
        out["examples"] = [{"id": p.query.id, "prediction": pr, "target": target_text(self.task, p.query)}
                           for p, pr in zip(prompts[:3], preds[:3])]
        out["predictions"] = preds
        return out


# ---------------------------------------------------------------- all tasks, all shots


def resolve_references(cfg: Mapping, tasks: Mapping[str, Task], oracle: Mapping[str, float], embedded: bool) -> dict:
    """Per task ``{"value", "source"}``: the paper's fine-tuned SotA or the oracle ceiling (see conf/eval)."""
    mode = cfg.get("reference", "auto")
    if mode not in ("auto", "paper", "oracle"):
        raise ValueError(f"eval.reference must be auto, paper or oracle; got {mode!r}")
    paper = {**PAPER_REFERENCES, **(cfg.get("paper_references") or {})}
    refs = {}
    for name in tasks:
        use_paper = mode == "paper" or (mode == "auto" and not embedded)
        if use_paper and name in paper:
            refs[name] = {"value": float(paper[name]), "source": "paper"}
        else:
            value = oracle.get(name)
            refs[name] = {"value": value if value else None, "source": "oracle"}
    return refs


def evaluate_model(model, root: str | Path, cfg: Mapping, *, out_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on the tasks of ``root`` (a world or an imported folder) at ``cfg['shots']``.

    Returns ``{"scores": {task: {k: {...}}}, "references", "overall": {k: ...}, "overall_score",
    "overall_tasks" (asked for), "overall_tasks_used" (those with a reference, which the Overall averages),
    "metrics": flat W&B-style keys, "table", "wall_time_s", ...}``; with ``out_dir`` the
    predictions go to ``out_dir/predictions/<task>_<k>shot.json``.
    """
    started = time.perf_counter()
    all_tasks = load_tasks(root)
    wanted = cfg.get("tasks") or list(all_tasks)
    unknown = [t for t in wanted if t not in all_tasks]
    if unknown:
        raise KeyError(f"eval.tasks names {unknown}, not in {root}; it has {sorted(all_tasks)}")
    tasks = {t: all_tasks[t] for t in wanted}
    shots = [int(k) for k in cfg["shots"]]
    bad = [k for k in shots if k < 0]
    if bad:
        raise ValueError(f"eval.shots must be >= 0; got {bad}")
    was_training = model.training
    model.eval()
    scores: dict[str, dict[str, Any]] = {}
    oracle: dict[str, float] = {}
    controls = list(cfg.get("controls") or [])
    control_scores: dict[str, dict[str, Any]] = {c: {} for c in controls}
    try:
        for name, task in tasks.items():
            ev = TaskEvaluator(model, task, cfg, progress=progress)
            oracle[name] = oracle_score(task, ev.test)
            scores[name] = {}
            for k in shots:
                res = ev.run(k)
                preds = res.pop("predictions")
                if out_dir is not None:
                    pdir = Path(out_dir) / "predictions"
                    pdir.mkdir(parents=True, exist_ok=True)
                    (pdir / f"{name}_{k}shot.json").write_text(json.dumps(
                        [{"id": it.id, "prediction": p, "target": target_text(task, it)}
                         for it, p in zip(ev.test, preds)], indent=1))
                scores[name][str(k)] = res
                log.info("%s %d-shot: %s %.2f (%d items, %.1fs)", name, k, task.metric, res["score"], res["n"],
                         res["seconds"])
                if "in_context" in res:
                    ic = res["in_context"]
                    log.info("%s %d-shot: a random shown answer would score %.2f; %.0f%% of answers repeat one shown, "
                             "%.0f%% are one of the episode's answers", name, k, ic["guess_shown"], ic["copied"],
                             ic.get("in_episode", float("nan")))
            for control in controls:
                if not all(has_scene(it) for it in ev.test + ev.support):
                    control_scores[control][name] = {"skipped": "items without scene metadata (not an embedded world)"}
                    continue
                control_scores[control][name] = {}
                for k in shots:
                    res = ev.run(k, control)
                    res.pop("predictions")
                    control_scores[control][name][str(k)] = res
                    log.info("%s %d-shot, %s control: %s %.2f", name, k, control, task.metric, res["score"])
    finally:
        model.train(was_training)
    refs = resolve_references(cfg, tasks, oracle, is_embedded_world(root))
    overall_tasks = [t for t in (cfg.get("overall_tasks") or DEV_TASKS) if t in tasks]
    if not overall_tasks:
        overall_tasks = [t for t, task in tasks.items() if not task.in_context]
    overall = {str(k): M.overall_score({t: scores[t][str(k)]["score"] for t in overall_tasks},
                                       {t: refs[t]["value"] for t in overall_tasks}) for k in shots}
    overall_used = M.overall_tasks_used(overall_tasks, {t: refs[t]["value"] for t in overall_tasks})
    main_k = int(cfg.get("overall_shots", 4))
    main_k = main_k if main_k in shots else max(shots)
    metrics = {}
    for t, per_k in scores.items():
        for k, res in per_k.items():
            metrics[f"eval/{t}_{res['metric']}_{k}shot"] = res["score"]
            if res.get("roc_auc") is not None:
                metrics[f"eval/{t}_roc_auc_{k}shot"] = res["roc_auc"]
    for control, per_task in control_scores.items():
        for t, per_k in per_task.items():
            for k, res in per_k.items():
                if isinstance(res, dict) and "score" in res:
                    metrics[f"eval_{control}/{t}_{res['metric']}_{k}shot"] = res["score"]
    for k, v in overall.items():
        if v is not None:
            metrics[f"eval/overall_{k}shot"] = v
    if overall[str(main_k)] is not None:
        metrics["eval/overall"] = overall[str(main_k)]
    result = {
        "root": str(root), "shots": shots, "support": cfg.get("support", "random"), "scores": scores,
        "controls": control_scores, "references": refs, "oracle": oracle, "overall_tasks": overall_tasks,
        "overall_tasks_used": overall_used, "overall": overall, "overall_shots": main_k,
        "overall_score": overall[str(main_k)], "metrics": metrics,
        "wall_time_s": time.perf_counter() - started,
    }
    result["table"] = format_table(result)
    return result


def format_table(result: Mapping) -> str:
    """Per-task scores by k, the reference used, and the Overall row."""
    shots = result["shots"]
    head = f"{'task':<18}{'metric':<14}" + "".join(f"{str(k) + '-shot':>10}" for k in shots) + f"{'reference':>16}"
    lines = [head, "-" * len(head)]
    for t, per_k in result["scores"].items():
        ref = result["references"][t]
        ref_s = f"{ref['value']:.1f} ({ref['source']})" if ref["value"] else f"- ({ref['source']})"
        metric = next(iter(per_k.values()))["metric"] if per_k else ""
        lines.append(f"{t:<18}{metric:<14}" + "".join(f"{per_k[str(k)]['score']:>10.2f}" for k in shots)
                     + f"{ref_s:>16}")
    lines.append("-" * len(head))
    ov = result["overall"]
    lines.append(f"{'Overall (%)':<32}" + "".join(f"{ov[str(k)]:>10.2f}" if ov[str(k)] is not None else f"{'-':>10}"
                                                  for k in shots))
    used = result.get("overall_tasks_used", result["overall_tasks"])  # results written before it was recorded
    left_out = [t for t in result["overall_tasks"] if t not in used]
    lines.append(f"Overall = mean of score / reference over {', '.join(used) or 'no task'}; "
                 + (f"left out (no reference): {', '.join(left_out)}; " if left_out else "")
                 + f"headline eval/overall at {result['overall_shots']} shots")
    return "\n".join(lines)
