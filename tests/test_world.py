"""The embedded world's promises: tasks in the evaluation contract, balanced answers, held-out
combinations, facts only in the text corpus and frequent there, prompt formats only in m3w pages."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import pytest
from PIL import Image

from flamingo_lab.data.shards import load_world
from flamingo_lab.data.world import (
    CELL_NAMES,
    FRUITS,
    IMPLICIT_TYPES,
    THINGS,
    TASKS,
    WorldConfig,
    corpus_paragraph,
    make_doc_sample,
    make_pair,
    make_task_sample,
    make_video_pair,
    write_world,
)


def _members(path) -> dict[str, dict[str, bytes]]:
    """Samples of a tar as {key: {ext: bytes}} (plain tarfile: independent of the reader under test)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def world(tiny_world_dir):
    return load_world(tiny_world_dir)


def test_tasks_follow_the_evaluation_contract(world):
    tasks = world["tasks"]
    assert {"coco", "okvqa", "vqav2", "msvdqa", "vatex"} <= set(tasks)
    assert any(t["in_context"] for t in tasks.values())
    expect = {"coco": ("caption", "cider"), "okvqa": ("vqa", "vqa_accuracy"), "vqav2": ("vqa", "vqa_accuracy"),
              "msvdqa": ("video_qa", "top1"), "vatex": ("video_caption", "cider")}
    for name, (kind, metric) in expect.items():
        assert (tasks[name]["kind"], tasks[name]["metric"]) == (kind, metric)
    for name, spec in tasks.items():
        F = spec["frames"]
        assert F == (world["config"]["frames"] if spec["kind"].startswith("video") else 1)
        for split in ("support", "test"):
            assert spec["splits"][split] and all(p.startswith(world["root"]) for p in spec["splits"][split])
            for shard in spec["splits"][split]:
                for key, m in _members(shard).items():
                    assert sorted(m) == sorted([*(f"{f}.png" for f in range(F)), "json"]), (name, m.keys())
                    assert Image.open(io.BytesIO(m["0.png"])).size == (32, 32)
                    meta = json.loads(m["json"])
                    assert {"id", "question", "answers", "captions", "episode", "scene"} <= set(meta)
                    if spec["kind"] == "vqa":  # implicit_question leaves its question out (its shots say it)
                        assert bool(meta["question"]) == (name != "implicit_question")
                        assert len(meta["answers"]) == (1 if spec["metric"] == "top1" else 10)
                    if spec["kind"] == "video_qa":
                        assert meta["question"] and len(meta["answers"]) >= 1
                    if spec["kind"].endswith("caption"):
                        assert len(meta["captions"]) >= 4 and meta["question"] is None
                    assert (meta["episode"] is not None) == spec["in_context"]


def test_every_prompt_and_answer_word_is_in_the_tokenizer(world, tiny_world_dir):
    from flamingo_lab.data.shards import load_world_tokenizer

    vocab = load_world_tokenizer(tiny_world_dir).get_vocab()
    words = {"output", "question", "answer", *FRUITS.values(), *THINGS.values()}
    for spec in world["tasks"].values():
        for shard in spec["splits"]["test"] + spec["splits"]["support"]:
            for m in _members(shard).values():
                meta = json.loads(m["json"])
                for text in [meta["question"] or "", *meta["answers"], *meta["captions"]]:
                    words.update(text.lower().replace("?", " ").replace(".", " ").replace(",", " ").replace(":", " ").split())
    missing = sorted(w for w in words if w not in vocab)
    assert not missing
    # the corpus writes <|endofchunk|> between question items: one special token, never words of its own
    corpus = (tiny_world_dir / world["corpus"]["train"]).read_text()
    assert "<|endofchunk|>" in corpus and not {"endofchunk", "<", "|", ">"} & set(vocab)


def test_the_tokenizer_is_a_pure_function_of_its_texts(tmp_path):
    """Equally frequent words get ids in alphabetical order (the tokenizers library's trainer broke such
    ties in hash order: one corpus, a different tokenizer.json on each run), specials come first and
    whole, and a word below min_frequency is unknown."""
    from flamingo_lab.data.tokenizer import SPECIAL_TOKENS, train_word_tokenizer

    texts = ["Wug dax fep. <image> zup, dax<|endofchunk|>", "kiki bouba toma lorp mib tufa pilk nerm sorn vab"]
    a = train_word_tokenizer(texts, tmp_path / "a")
    train_word_tokenizer(list(reversed(texts)), tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    vocab = a.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    once = ["bouba", "fep", "kiki", "lorp", "mib", "nerm", "pilk", "sorn", "toma", "tufa", "vab", "wug", "zup"]
    assert vocab["dax"] == len(SPECIAL_TOKENS)  # the only word said twice
    assert sorted(once, key=vocab.__getitem__) == once  # ties: alphabetical
    assert not {"image", "endofchunk", "<", "|", ">"} & set(vocab)
    ids = a("<image>wug, dax<|endofchunk|>")["input_ids"]
    assert a.convert_ids_to_tokens(ids) == ["<s>", "<image>", "wug", ",", "dax", "<|endofchunk|>"]
    rare = train_word_tokenizer(texts, tmp_path / "c", min_frequency=2).get_vocab()
    assert "dax" in rare and "wug" not in rare


def test_a_world_of_another_format_is_refused_and_rewritten(tiny_world_dir, tmp_path):
    """A world written by an older version (other shards, corpus or tokenizer) is never read as if current:
    load_world names the command that rewrites it, flamingo-data treats it as missing, and the pretraining
    cache keys differ (no stage trained on it is reused)."""
    import shutil

    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import existing_config
    from flamingo_lab.pretrain.cache import stage_key

    tmp_path = tmp_path / "world"
    shutil.copytree(tiny_world_dir, tmp_path)
    current = load_world(tmp_path)
    assert current["format"] == WORLD_FORMAT and existing_config(tmp_path) == current["config"]
    old = json.loads((tmp_path / "world.json").read_text())
    old["format"] = "flamingo-lab-world/5"
    (tmp_path / "world.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"format 'flamingo-lab-world/5'.*flamingo-data out_dir="):
        load_world(tmp_path)
    assert existing_config(tmp_path) is None  # flamingo-data rewrites it
    assert stage_key("lm", {"a": 1}, old) != stage_key("lm", {"a": 1}, current)


def _cfg(**kw) -> WorldConfig:
    return WorldConfig(name="t", **kw)


def test_a_world_written_before_a_key_existed_stays_current(tiny_world_dir, tmp_path):
    """A key added to the world config later (game_bare, game_words, game_cues, vtp_moves) reads, in a world.json written
    without it, as the value that writes the same world: flamingo-data does not rewrite that world and its cached
    stages keep their keys. At another value the world is another world."""
    import shutil
    from dataclasses import asdict

    from flamingo_lab.data.world import BACKWARD_DEFAULTS, _rng, sample_clip
    from flamingo_lab.make_data import existing_config
    from flamingo_lab.pretrain.cache import stage_key

    tmp_path = tmp_path / "world"
    shutil.copytree(tiny_world_dir, tmp_path)
    current = load_world(tmp_path)
    older = json.loads((tmp_path / "world.json").read_text())
    for key, value in BACKWARD_DEFAULTS.items():  # those at the old value (the tiny world's position_words is not)
        if older["config"][key] == value:
            del older["config"][key]
    assert not {"game_bare", "game_words", "game_cues", "vtp_moves"} & set(older["config"])
    (tmp_path / "world.json").write_text(json.dumps(older))
    assert existing_config(tmp_path) == current["config"]  # flamingo-data: complete with this config, skipped
    assert stage_key("lm", {"a": 1}, older) == stage_key("lm", {"a": 1}, current) == \
        stage_key("lm", {"a": 1}, load_world(tmp_path))
    changed = {**current, "config": {**current["config"], "vtp_moves": 0.6}}
    assert stage_key("lm", {"a": 1}, changed) != stage_key("lm", {"a": 1}, current)
    # at its backward default vtp_moves draws the clips exactly as before the key existed
    cfg = WorldConfig(**{**current["config"], **BACKWARD_DEFAULTS})
    assert asdict(cfg)["vtp_moves"] == 0.25
    for i in range(30):
        before = sample_clip(_rng(cfg, "train", "vtp", i), cfg)
        assert make_video_pair(cfg, "train", i)["json"]["scene"] == before.meta()


def test_the_number_of_writing_processes_is_no_part_of_a_world(tiny_world_dir, tmp_path):
    """The tiny world written by 1 process (the fixture) and by 2 has the same bytes in every file but
    world.json, so it is one world: the same stage keys, flamingo-data does not rewrite it, the sweep takes
    it for the tiny world. Any other setting still makes another world."""
    import hashlib
    from dataclasses import asdict, replace

    from omegaconf import OmegaConf

    from flamingo_lab.make_data import compose_world, run
    from flamingo_lab.pretrain.cache import stage_key, world_fingerprint
    from flamingo_lab.sweep import check_world

    one = compose_world("tiny")
    assert one.workers == 1
    two = tmp_path / "two"
    write_world(replace(one, workers=2), two, progress=False)

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}

    assert digests(two) == digests(tiny_world_dir) and len(digests(two)) > 20
    w1, w2 = load_world(tiny_world_dir), load_world(two)
    assert (w1["config"]["workers"], w2["config"]["workers"]) == (1, 2)
    assert world_fingerprint(w1) == world_fingerprint(w2)
    assert stage_key("lm", {"a": 1}, w1) == stage_key("lm", {"a": 1}, w2)
    check_world(two, "tiny")  # conf/world/tiny.yaml says workers: 1
    before = (two / "world.json").read_bytes()
    assert run(OmegaConf.create({"world": asdict(one), "out_dir": str(two), "force": False, "progress": False})) is None
    assert (two / "world.json").read_bytes() == before  # skipped, not rewritten
    other = {**w2, "config": {**w2["config"], "seed": 1}}
    assert world_fingerprint(other) != world_fingerprint(w2)


def test_position_words_column_first_name_every_cell_column_first():
    """world.position_words=column_first: questions, their alternatives, captions, pages, implicit items, clip
    events and the text control's words all say "left top", never "top left"; the default world is unchanged."""
    from flamingo_lab.data.world import POSITION_WORDS, _alternatives, implicit_answer, implicit_scene, scene_text

    cfg, plain = _cfg(position_words="column_first"), _cfg()
    new, old = POSITION_WORDS["column_first"], CELL_NAMES
    assert cfg.cell_names() == new and plain.cell_names() == old and _alternatives(cfg, "position") == list(new)
    texts = []
    for i in range(80):
        for task in ("vqav2", "implicit_question", "vatex", "coco"):
            meta = make_task_sample(cfg, task, "test", i)["json"]
            if meta["qtype"] == "position":
                assert meta["answers"][0] in new
            texts += [*meta["answers"], *meta["captions"], scene_text(meta["scene"])]
        texts += [make_doc_sample(cfg, "train", i)["txt"] if "txt" in make_doc_sample(cfg, "train", i) else
                  json.dumps(make_doc_sample(cfg, "train", i)["json"]), make_pair(cfg, "train", i)["txt"],
                  make_video_pair(cfg, "train", i)["txt"], corpus_paragraph(cfg, "train", i)]
    assert not [t for t in texts if any(name in t for name in old)]
    assert sum(t.count(name) for t in texts for name in new) > 50
    scene = implicit_scene(__import__("random").Random(0), cfg, "position", "right bottom")
    assert implicit_answer(scene, "position") == "right bottom" and scene.meta()["cell_names"] == list(new)
    assert "cell_names" not in make_task_sample(plain, "vqav2", "test", 0)["json"]["scene"]  # default: as before
    with pytest.raises(ValueError, match=r"world.position_words must be one of \['column_first', 'row_first'\]"):
        _cfg(position_words="diagonal")


def test_answers_are_balanced_per_question_type():
    cfg = _cfg()
    for task in ("vqav2", "okvqa", "msvdqa", "renamed_colours"):
        by_type: dict[str, Counter] = {}
        for i in range(600):
            meta = make_task_sample(cfg, task, "test", i)["json"]
            by_type.setdefault(meta["qtype"], Counter())[meta["answers"][0]] += 1
        for qtype, c in by_type.items():
            share = max(c.values()) / sum(c.values())
            assert share <= 0.4, (task, qtype, c)


def test_held_out_combinations_only_in_test_splits():
    cfg = _cfg()
    held = {tuple(p) for p in cfg.held_out}

    def pairs(scene):
        return {(o["colour"], o["shape"]) for o in scene["objects"]}

    for i in range(150):
        assert not pairs(make_pair(cfg, "train", i, "ltip")["json"]["scene"]) & held
        assert not pairs(make_video_pair(cfg, "train", i)["json"]["scene"]) & held
        for info in make_doc_sample(cfg, "train", i)["json"]["image_info"]:
            assert not pairs(info["scene"]) & held
        for task in ("coco", "vqav2", "msvdqa"):
            assert not pairs(make_task_sample(cfg, task, "support", i)["json"]["scene"]) & held
    test = [make_task_sample(cfg, "vqav2", "test", i)["json"] for i in range(200)]
    share = sum(bool(pairs(m["scene"]) & held) for m in test) / len(test)
    assert 0.2 < share < 0.45  # held_out_share 0.3 of test items target a held-out combination


def test_facts_only_in_the_corpus_and_frequent_there():
    cfg = _cfg()
    corpus = " ".join(corpus_paragraph(cfg, "train", i) for i in range(cfg.n_corpus_train))
    for colour in cfg.colours:
        assert corpus.count(FRUITS[colour]) >= 200  # the LM sees each fact hundreds of times
    for shape in cfg.shapes:
        assert corpus.count(THINGS[shape]) >= 200
    fact_words = set(FRUITS.values()) | set(THINGS.values())
    knowledge = 0
    for i in range(300):
        pairs = [make_pair(cfg, "train", i, s)["txt"] for s in ("ltip", "align", "laion")]
        assert not fact_words & set(" ".join(pairs).replace(".", " ").split())
        doc = make_doc_sample(cfg, "train", i)["json"]
        for k, text in enumerate(doc["text_list"]):  # pages name a fruit or thing only as a quiz answer
            words = set(text.replace(".", " ").replace("?", " ").split())
            if not words & fact_words:
                continue
            assert text.startswith("Question: which fruit") or text.startswith("Question: what thing"), text
            info = next(x for x in doc["image_info"] if x["matched_text_index"] == k)  # about its own image
            answer = text.rsplit("Answer: ", 1)[1]
            assert answer in {FRUITS[o["colour"]] for o in info["scene"]["objects"]} | \
                {THINGS[o["shape"]] for o in info["scene"]["objects"]}
            knowledge += 1
    assert knowledge > 20  # quiz_types asks knowledge questions about pictures; the facts stay in the corpus


def test_prompt_formats_in_m3w_pages_and_video_qa_pairs_not_in_image_pairs():
    cfg = _cfg()
    docs = [make_doc_sample(cfg, "train", i)["json"] for i in range(300)]
    kinds = Counter(d["page_kind"] for d in docs)
    assert set(kinds) == {"describe", "quiz", "gallery", "game", "mixed", "implicit"}
    text = " ".join(" ".join(d["text_list"]) for d in docs)
    assert "Question:" in text and "Answer:" in text and "Output:" in text
    for i in range(300):
        for s in ("ltip", "align", "laion"):
            cap = make_pair(cfg, "train", i, s)["txt"]
            assert "Question" not in cap and "Output" not in cap and "Answer" not in cap
        assert "Output" not in make_video_pair(cfg, "train", i)["txt"]
    videos = [make_video_pair(cfg, "train", i) for i in range(400)]
    qa = [v for v in videos if v["json"]["text_kind"] == "qa"]
    assert 0.15 < len(qa) / len(videos) < 0.35  # vtp_qa = 0.25 of the clips carry a question and its answer
    assert all(v["txt"].startswith("Question: ") and " Answer: " in v["txt"] for v in qa)
    assert not any("Question" in v["txt"] for v in videos if v["json"]["text_kind"] == "caption")


def test_vtp_moves_sets_the_share_of_moving_clips_in_training_only():
    def moving(cfg, make):
        return sum(make(i)["json"]["scene"]["event"] == "moves" for i in range(400)) / 400

    plain, more = _cfg(), _cfg(vtp_moves=0.6)
    assert 0.17 < moving(plain, lambda i: make_video_pair(plain, "train", i)) < 0.33  # four events alike
    assert 0.52 < moving(more, lambda i: make_video_pair(more, "train", i)) < 0.68
    moves = [make_video_pair(more, "train", i) for i in range(400)]
    moves = [v for v in moves if v["json"]["scene"]["event"] == "moves"]
    assert {v["json"]["scene"]["detail"] for v in moves} == {"left", "right", "up", "down"}
    # the video tasks are not the training mixture: their events stay alike, so their questions do not change
    for cfg in (plain, more):
        assert 0.17 < moving(cfg, lambda i: make_task_sample(cfg, "msvdqa", "test", i)) < 0.33
    assert [make_task_sample(more, "msvdqa", "test", i)["json"] for i in range(50)] == \
        [make_task_sample(plain, "msvdqa", "test", i)["json"] for i in range(50)]
    with pytest.raises(ValueError, match="vtp_moves"):
        _cfg(vtp_moves=1.5)


def test_vtp_clips_writes_video_pages_whose_clips_read_as_a_few_shot_prompt_reads():
    """world.vtp_clips=N: each video sample is a page of N clips, each before its own caption or question
    (the prompt format a k-shot video prompt uses); at 1 the pairs are written exactly as before the key."""
    from flamingo_lab.data.shards import sample_text_and_images

    pairs, pages = _cfg(vtp_moves=0.6), _cfg(vtp_moves=0.6, vtp_clips=3)
    assert make_video_pair(_cfg(vtp_moves=0.6, vtp_clips=1), "train", 5) == make_video_pair(pairs, "train", 5)
    kinds = Counter()
    for i in range(100):
        page = make_video_pair(pages, "train", i)
        meta = page["json"]
        assert "txt" not in page and len(meta["text_list"]) == len(meta["image_info"]) == 3
        decoded = {k: Image.open(io.BytesIO(v)).convert("RGB") if k.endswith(".png") else v for k, v in page.items()}
        text, clips = sample_text_and_images(decoded)
        assert text.count("<image>") == text.count("<|endofchunk|>") == 3 and text.startswith("<image>")
        assert [len(c) for c in clips] == [pages.frames] * 3
        for c, (info, sentence, frames) in enumerate(zip(meta["image_info"], meta["text_list"], clips)):
            assert info["matched_text_index"] == c and f"<image>{sentence}<|endofchunk|>" in text
            kinds[info["text_kind"]] += 1
            event, detail = info["scene"]["event"], info["scene"]["detail"]
            if info["text_kind"] == "qa" and event == "moves":
                assert sentence.startswith("Question: which way does") and sentence.endswith(f"Answer: {detail}")
            assert frames[0].tobytes() != frames[-1].tobytes()  # every event changes the picture
    assert 0.15 < kinds["qa"] / sum(kinds.values()) < 0.35  # vtp_qa of the clips, as in pairs
    assert kinds["qa"] + kinds["caption"] == 300
    with pytest.raises(ValueError, match="vtp_clips"):
        _cfg(vtp_clips=0)


def test_game_pages_give_labels_only_in_context():
    cfg = _cfg()
    games = [d for d in (make_doc_sample(cfg, "train", i)["json"] for i in range(300)) if d["page_kind"] == "game"]
    assert len({json.dumps(g["mapping"], sort_keys=True) for g in games}) > len(games) // 2  # fresh names per page
    # an episode's support covers every colour, with one mapping per episode, different across episodes
    mappings = []
    for ep in range(3):
        sup = [make_task_sample(cfg, "renamed_colours", "support", ep * cfg.episode_support + k)["json"]
               for k in range(cfg.episode_support)]
        assert {m["episode"] for m in sup} == {ep}
        assert {m["scene"]["objects"][0]["colour"] for m in sup} == set(cfg.colours)
        assert len({json.dumps(m["mapping"]) for m in sup}) == 1
        mappings.append(sup[0]["mapping"])
        test = make_task_sample(cfg, "renamed_colours", "test", ep * cfg.episode_test)["json"]
        assert test["episode"] == ep and test["mapping"] == sup[0]["mapping"]
        assert test["answers"] == [test["mapping"][test["scene"]["objects"][0]["colour"]]]
    assert mappings[0] != mappings[1]


def _implicit_kind(cfg, answers):
    """The one kind of question (colour, shape, position) that all ``answers`` answer, else None."""
    values = {"colour": set(cfg.colours), "shape": set(cfg.shapes), "position": set(CELL_NAMES)}
    kinds = [k for k in IMPLICIT_TYPES if set(answers) <= values[k]]
    return kinds[0] if len(kinds) == 1 else None


def test_implicit_question_pages_corpus_and_episodes_ask_one_kind_that_only_the_answers_say():
    """The question left implicit: m3w pages, corpus paragraphs and task episodes answer one kind of question
    (colour, shape or position of a single object) as "Answer: <answer>" with no question, each answer true of
    its image; episodes spread evenly over the kinds, and the task's 0-shot prompt is the query alone."""
    cfg = _cfg()
    truth = lambda scene, kind: {"colour": scene["objects"][0]["colour"], "shape": scene["objects"][0]["shape"],  # noqa: E731
                                 "position": scene["objects"][0]["position"]}[kind]
    pages = [d for d in (make_doc_sample(cfg, "train", i)["json"] for i in range(300)) if d["page_kind"] == "implicit"]
    assert len(pages) > 15
    kinds = Counter()
    for page in pages:
        texts = [page["text_list"][info["matched_text_index"]] for info in page["image_info"]]
        assert all(t.startswith("Answer: ") for t in texts) and not any("Question" in t for t in page["text_list"])
        answers = [t[len("Answer: "):] for t in texts]
        kind = _implicit_kind(cfg, answers) or _implicit_kind(cfg, answers[:1])
        kinds[kind] += 1
        for info, a in zip(page["image_info"], answers):
            assert info["scene"]["n_objects"] == 1 and truth(info["scene"], kind) == a
    assert set(kinds) == set(IMPLICIT_TYPES)
    paragraphs = [p for p in (corpus_paragraph(cfg, "train", i) for i in range(600))
                  if "Answer:" in p and "Question" not in p]
    assert len(paragraphs) > 8
    for p in paragraphs:
        items = re.findall(r"a (?:small|big) (\w+) (\w+) in the ([\w ]+?)\. Answer: ([\w ]+?)(?=<\||$| a (?:small|big) )", p)
        assert len(items) >= 2, p
        kind = _implicit_kind(cfg, [a for *_, a in items]) or _implicit_kind(cfg, [items[0][3]])
        assert all(a == dict(zip(("colour", "shape", "position"), (c, s, pos)))[kind] for c, s, pos, a in items), p
    per = cfg.episode_support
    episodes = []
    for ep in range(6):
        sup = [make_task_sample(cfg, "implicit_question", "support", ep * per + k)["json"] for k in range(per)]
        test = [make_task_sample(cfg, "implicit_question", "test", ep * cfg.episode_test + k)["json"]
                for k in range(cfg.episode_test)]
        assert {m["episode"] for m in sup + test} == {ep} and all(m["question"] is None for m in sup + test)
        kind = sup[0]["qtype"]
        assert {m["qtype"] for m in sup + test} == {kind}
        assert all(m["answers"] == [truth(m["scene"], kind)] for m in sup + test)
        assert {m["answers"][0] for m in sup} == set(_implicit_values(cfg, kind))  # every answer shown
        episodes.append(kind)
    assert Counter(episodes) == {k: 2 for k in IMPLICIT_TYPES}


def _implicit_values(cfg, kind):
    return {"colour": cfg.colours, "shape": cfg.shapes, "position": list(CELL_NAMES)}[kind]


def test_bare_colour_game_items_in_the_corpus_and_word_items_on_game_pages():
    """world.game_bare: corpus game items name their colour with one bare word where an image would stand;
    world.game_words: m3w game items after the first image come in that form with no image. The default
    world has neither."""
    from flamingo_lab.data.shards import sample_text_and_images

    bare = re.compile(r"(?:^|\. |<\|endofchunk\|>| )(red|green|blue|yellow|purple) Question: what colour is it\? Answer: (\w+)")
    games = lambda c: [p for p in (corpus_paragraph(c, "train", i) for i in range(300))  # noqa: E731
                       if "Question: what colour is it? Answer:" in p]
    assert not any(bare.search(p) for p in games(_cfg()))
    all_bare = games(_cfg(game_bare=1.0))
    assert all_bare and all(bare.search(p) for p in all_bare)
    assert not any(re.search(r"in the [\w ]+\. Question: what colour", p) for p in all_bare)
    for g in all_bare[:20]:  # the mapping holds across items: each colour keeps its fresh word
        items = bare.findall(g)
        assert all(len({w for c2, w in items if c2 == c}) == 1 for c, _ in items)

    cfg = _cfg(game_words=1.0)
    pages = [make_doc_sample(cfg, "train", i) for i in range(300)]
    pages = [p for p in pages if p["json"]["page_kind"] == "game"]
    assert pages
    for p in pages:
        meta = p["json"]
        decoded = {k: Image.open(io.BytesIO(v)) if k.endswith(".png") else v for k, v in p.items()}
        text, images = sample_text_and_images(decoded)
        assert len(images) == 1 and text.count("<image>") == 1  # the first item only is shown
        items = [t for t in meta["text_list"] if "Question:" in t]
        assert len(items) >= 2 and all(bare.search(t) for t in items[1:]) and not bare.search(items[0])
        colour = meta["image_info"][0]["scene"]["objects"][0]["colour"]
        assert items[0].endswith(meta["mapping"][colour])
    with pytest.raises(ValueError, match="game_words"):
        WorldConfig(game_words=1.5)
    # world=in_context: the embedded world with both forms at half, and more game pages
    from flamingo_lab.make_data import compose_world
    ic, emb = compose_world("in_context"), compose_world("embedded")
    assert (ic.name, ic.game_bare, ic.game_words, ic.page_kinds["game"]) == ("in_context", 0.5, 0.5, 0.4)
    assert (emb.game_bare, emb.game_words) == (0.0, 0.0) and ic.n_train_m3w == emb.n_train_m3w


def test_cued_games_in_the_corpus_bind_arbitrary_words():
    """world.game_cues: that share of the corpus's games names each colour by a cue word of any kind (one per
    colour for the whole game, never one of the game's answers); at 0 the corpus is the same as before."""
    from flamingo_lab.data.world import CUE_WORDS, NONSENSE

    item = re.compile(r"(\w+) Question: what colour is it\? Answer: (\w+)")
    games = lambda c: [p for p in (corpus_paragraph(c, "train", i) for i in range(300))  # noqa: E731
                       if "Question: what colour is it? Answer:" in p]
    plain = games(_cfg(game_bare=0.5))
    assert plain == games(_cfg(game_bare=0.5, game_cues=0.0))
    cued = [g for g in games(_cfg(game_bare=0.5, game_cues=1.0))]
    assert len(cued) == len(plain)
    seen = set()
    for g in cued:
        items = item.findall(g)
        assert items and all(cue in CUE_WORDS and cue not in {a for _, a in items} for cue, _ in items)
        assert all(len({a for c2, a in items if c2 == c}) == 1 for c, _ in items)  # one answer per cue
        assert all(len({c2 for c2, a2 in items if a2 == a}) == 1 for _, a in items)  # one cue per answer
        seen |= {c for c, _ in items}
    assert seen - set(NONSENSE) and seen & set(NONSENSE)  # cues of every kind, nonsense words among them
    half = games(_cfg(game_bare=0.5, game_cues=0.5))
    share = sum(not re.search(r"(red|green|blue|yellow|purple) Question: what colour", g) for g in half) / len(half)
    assert 0.3 < share < 0.7
    with pytest.raises(ValueError, match="game_cues"):
        _cfg(game_cues=-0.1)


def test_videos_show_their_event():
    cfg = _cfg()
    events = Counter()
    for i in range(40):
        s = make_video_pair(cfg, "train", i)
        frames = [s[f"{f}.png"] for f in range(cfg.frames)]
        assert frames[0] != frames[-1]  # something moves, appears, disappears or changes
        events[s["json"]["scene"]["event"]] += 1
        event, detail = s["json"]["scene"]["event"], s["json"]["scene"]["detail"]
        assert (detail if event in ("moves", "turns") else event) in s["txt"]  # the caption names the event
    assert set(events) == {"moves", "appears", "disappears", "turns"}


def test_world_json_lists_corpus_tasks_and_balance(world):
    # the implicit question's 0-shot prompt is its query alone (its examples' text would name the kind asked)
    assert world["tasks"]["implicit_question"]["zero_shot_text_examples"] == 0
    assert all("zero_shot_text_examples" not in t for n, t in world["tasks"].items() if n != "implicit_question")
    for split in ("train", "val"):
        text = open(world["corpus"][split]).read()
        assert text.count("\n") == world["config"][f"n_corpus_{split}"]
    assert set(world["shards"]["train"]) == {"m3w", "ltip", "align", "laion", "vtp"}
    assert set(world["tasks"]) == set(TASKS)
    assert world["facts"]["fruit_of_colour"]["yellow"] == "banana"
    assert world["prompts"]["vqa"] == "<image>Question: {question} Answer: {answer}<|endofchunk|>"


def test_world_config_rejects_bad_values():
    with pytest.raises(ValueError, match="held_out entries"):
        WorldConfig(held_out=[["red", "hexagon"]])
    with pytest.raises(ValueError, match="frames"):
        WorldConfig(frames=12)
    with pytest.raises(ValueError, match="page_kinds"):
        WorldConfig(page_kinds={"poem": 1.0})


def test_corpus_holds_each_paragraph_kind_in_the_evaluation_formats():
    """Facts, described scenes with questions (knowledge ones too), the renaming game in words and clips
    with questions; none of them shows a held-out colour-shape pair."""
    cfg = _cfg()
    paragraphs = [corpus_paragraph(cfg, "train", i) for i in range(400)]
    games = [p for p in paragraphs if "Question: what colour is it? Answer:" in p]
    assert len(games) > 40
    for g in games[:20]:  # a renamed colour is answered with the same fresh word each time it comes back
        items = re.findall(r"a (?:small|big) (\w+) \w+ in the [\w ]+\. Question: what colour is it\? Answer: (\w+)", g)
        assert items and all(len({w for c2, w in items if c2 == c}) == 1 for c, _ in items)
    # most answers can be copied from an earlier item, and only by matching its colour: the words shown
    # before differ, so repeating one of them is not enough (what a 3-layer LM learns from short games)
    copyable = ambiguous = total = 0
    for g in games:
        items = re.findall(r"a (?:small|big) (\w+) \w+ in the [\w ]+\. Question: what colour is it\? Answer: (\w+)", g)
        for k, (c, _) in enumerate(items):
            total += 1
            if c in {c2 for c2, _ in items[:k]}:
                copyable += 1
                ambiguous += len({w for _, w in items[:k]}) > 1
    assert copyable / total > 0.4 and ambiguous / copyable > 0.8, (copyable, ambiguous, total)
    # as on Flamingo's pages and in its prompts, half the games end each item with <|endofchunk|>
    assert 0.3 < sum("Answer: " in g and "<|endofchunk|>" in g for g in games) / len(games) < 0.7
    assert any("Question: which fruit has the colour of" in p for p in paragraphs)
    assert any(re.search(r"(appears|disappears|moves|turns|goes|changes)[^.]*\. Question: ", p) for p in paragraphs)
    held = [f"{c} {s}" for c, s in cfg.held_out]
    assert not any(h in p for h in held for p in paragraphs)
    with pytest.raises(ValueError, match="corpus_kinds"):
        WorldConfig(corpus_kinds={"poetry": 1.0})
    with pytest.raises(ValueError, match="quiz_types"):
        WorldConfig(quiz_types=["smell"])


# ---------------------------------------------------------------------------------------------
# Held-out evaluation: what any model part trains on never holds an evaluation item (the audit's guards)
# ---------------------------------------------------------------------------------------------


def _scene_pairs(scene) -> set:
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def _training_images(world) -> tuple[dict, list]:
    """Every image of the training and validation sources (m3w pages, pairs, clips) as {sha256: where}, a clip as
    the digest of its frames together, and every (scene, texts, where, json) they hold."""
    import hashlib

    digest = lambda frames: hashlib.sha256(b"".join(frames)).hexdigest()  # noqa: E731
    images, scenes = {}, []
    for split in ("train", "val"):
        for source, shards in world["shards"][split].items():
            for shard in shards:
                for key, m in _members(world["root"] / shard).items():
                    meta = json.loads(m["json"])
                    where = f"{split}/{source}/{key}"
                    if "image_info" in meta:  # an m3w page: one scene per image
                        for info in meta["image_info"]:
                            images[digest([m[info["image_name"]]])] = where
                            scenes.append((info["scene"], meta["text_list"], where, meta))
                    else:
                        frames = [m["png"]] if "png" in m else [m[f"{f}.png"] for f in range(meta["frames"])]
                        images[digest(frames)] = where
                        scenes.append((meta["scene"], [m["txt"].decode()], where, meta))
    return images, scenes


def _task_items(world, task, split) -> list[tuple[dict, bytes]]:
    import hashlib

    spec, out = world["tasks"][task], []
    for shard in spec["splits"][split]:
        for m in _members(world["root"] / shard).values():
            frames = [m[f"{f}.png"] for f in range(spec["frames"])]
            out.append((json.loads(m["json"]), hashlib.sha256(b"".join(frames)).hexdigest()))
    return out


def _scene_key(scene) -> tuple:
    return (sorted((o["colour"], o["shape"], o["size"], o["cell"]) for o in scene["objects"]), scene["background"],
            scene.get("event"), scene.get("detail"))


def test_no_evaluation_item_is_a_training_or_support_item(world, tiny_world_dir):
    """No test item's image (a clip: its frames together) is pixel-identical to an image of any training or validation
    source (m3w, pairs, clips: what the LM-free stages and Flamingo train on) or to a support item, and no test scene
    (objects, background, event) is one of theirs; task shards are files of their own. (In the embedded world, seed 0,
    one vqav2 test image of 300 equals an m3w image by chance, a one-object scene on a background of the same shade.)"""
    world = {**world, "root": tiny_world_dir}
    images, scenes = _training_images(world)
    train_scenes = {json.dumps(_scene_key(s)) for s, _, _, _ in scenes}
    train_files = {f for split in ("train", "val") for shards in world["shards"][split].values() for f in shards}
    assert len(images) > 100
    for task, spec in world["tasks"].items():
        assert not (set(spec["splits"]["test"]) & (set(spec["splits"]["support"]) | train_files))
        support = _task_items(world, task, "support")
        test = _task_items(world, task, "test")
        support_images = {d for _, d in support}
        support_scenes = {json.dumps(_scene_key(m["scene"])) for m, _ in support}
        assert not {m["id"] for m, _ in test} & {m["id"] for m, _ in support}, task
        for meta, d in test:
            assert d not in images, (task, meta["id"], images.get(d))
            assert d not in support_images, (task, meta["id"])
            assert json.dumps(_scene_key(meta["scene"])) not in train_scenes | support_scenes, (task, meta["id"])


def test_held_out_pairs_are_shown_only_by_test_items_and_named_in_training_only_by_wrong_captions(world, tiny_world_dir):
    """No training or validation image, no clip (before or after an object turns) and no support item shows a
    held-out colour-shape pair, and the LM corpus never names one. The only training texts that name one are
    align/laion captions of the kind "wrong" (a wrong colour for an object shown), which name a pair their image
    does not show."""
    world = {**world, "root": tiny_world_dir}
    held = {tuple(p) for p in world["config"]["held_out"]}
    pattern = re.compile(r"\b(\w+) (" + "|".join(world["config"]["shapes"]) + r")\b")
    _, scenes = _training_images(world)
    for scene, texts, where, meta in scenes:
        assert not _scene_pairs(scene) & held, where
        if scene.get("event") == "turns":
            assert (scene["detail"], scene["objects"][scene["actor"]]["shape"]) not in held, where
        named = {p for t in texts for p in pattern.findall(t)} & held
        if named:  # a wrong caption: it names what its image does not show
            assert where.split("/")[1] in ("align", "laion") and meta["caption_noise"] == "wrong", (where, texts)
            assert not named & _scene_pairs(scene), where
    assert len(scenes) > 100
    for split, path in world["corpus"].items():
        text = (tiny_world_dir / path).read_text()
        assert not any(f"{c} {s}" in text for c, s in held), split
    for task in world["tasks"]:
        for meta, _ in _task_items(world, task, "support"):
            assert not _scene_pairs(meta["scene"]) & held and not meta["held_out"], (task, meta["id"])
    # generated beyond the tiny world's few samples: the pair sources' captions and images
    cfg = _cfg()
    for i in range(120):
        for source in ("align", "laion"):
            s = make_pair(cfg, "train", i, source)
            named = set(pattern.findall(s["txt"])) & held
            assert not _scene_pairs(s["json"]["scene"]) & held
            assert not named or (s["json"]["caption_noise"] == "wrong" and not named & _scene_pairs(s["json"]["scene"]))


def test_an_items_held_out_label_says_that_its_scene_shows_a_held_out_pair(tiny_world_dir):
    """The evaluation's held_out=True group holds only items whose scene shows a held-out pair. The world writes
    held_out as drawn, and a held-out item asking about a colour without a held-out pair (purple) falls back to a
    seen pair (the tiny world: okvqa-test-0000003, renamed_colours-test-0000002); read_items labels it from the scene."""
    from flamingo_lab.eval.tasks import held_out_pairs, load_tasks, read_items

    held = {tuple(p) for p in json.loads((tiny_world_dir / "world.json").read_text())["held_out"]}
    n_held = 0
    for name, task in load_tasks(tiny_world_dir).items():
        assert held_out_pairs(task.test[0]) == held
        for split in ("test", "support"):
            for it in read_items(getattr(task, split), task.frames):
                shows = bool(_scene_pairs(it.meta["scene"]) & held)
                assert it.meta["held_out"] == shows, (name, it.id, it.meta["scene"]["objects"])
                n_held += shows
    assert n_held >= 10


def test_evaluation_items_do_not_depend_on_training_settings():
    """Every item draws from its own stream (seed, split, task, index): changing what the training sources, the
    corpus or the counts hold leaves every evaluation item byte for byte as it was."""
    from dataclasses import replace

    from flamingo_lab.data.world import encode_sample

    base = _cfg(n_test=6, n_support=6, n_episodes=2, episode_support=5, episode_test=3)
    variants = [dict(n_train_m3w=7, n_train_align=1, n_corpus_train=3), dict(page_kinds={"describe": 1.0}),
                dict(corpus_kinds={"facts": 1.0}), dict(game_words=0.5, game_bare=0.5, game_cues=0.5),
                dict(vtp_moves=0.7, vtp_qa=0.9, align_noise=0.9, laion_wrong=0.5, laion_vague=0.1),
                dict(quiz_types=["colour"], min_images_per_doc=3), dict(n_test=600, n_support=9)]
    items = [(task, split, i) for task in TASKS for split in ("support", "test") for i in (0, 3)]
    ref = {k: encode_sample(make_task_sample(base, *k)) for k in items}
    for change in variants:
        cfg = replace(base, **change)
        for k in items:
            assert encode_sample(make_task_sample(cfg, *k)) == ref[k], (change, k)


def test_a_query_is_never_its_own_shot():
    """The support pool leaves out an item with the query's id (support and test ids differ in a world; the guard
    holds where a folder gives the same items for both) and, for in-context tasks, keeps to the query's episode."""
    from flamingo_lab.eval.prompts import SupportSampler
    from flamingo_lab.eval.tasks import Item, Task

    items = [Item(id=f"q{i}", images=[], answers=["a"], episode=i % 2) for i in range(6)]
    for in_context in (False, True):
        task = Task(name="t", kind="vqa", metric="top1", support=["s"], test=["t"], in_context=in_context)
        sampler = SupportSampler(task, items, method="random")
        for q in items:
            shots = sampler.sample(q, 8)
            assert q.id not in {s.id for s in shots} and len(shots) == (2 if in_context else 5)
            assert not in_context or {s.episode for s in shots} == {q.episode}
