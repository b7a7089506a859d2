"""The shared pretraining stages: the LM stage learns the world's text, and stages are cached by config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flamingo_lab.config import compose
from flamingo_lab.models import build_flamingo
from flamingo_lab.pretrain import ensure_pretrained


def lm_stage_cfg(world, cache, *extra):
    return compose([
        "scale=tiny", f"data.root={world}", f"pretrain.cache_dir={cache}",
        "pretrain.lm.enabled=true", "pretrain.lm.steps=60", "pretrain.lm.batch_size=16", "pretrain.lm.seq_len=32",
        "pretrain.lm.bf16=false", *extra,
    ])


def test_lm_stage_learns_and_is_cached_and_loaded(tiny_world_dir, tmp_path):
    cfg = lm_stage_cfg(tiny_world_dir, tmp_path)
    first = ensure_pretrained(cfg, progress=False)["lm"]
    assert first["built_now"]
    # learned something real: held-out perplexity far below a random model's
    assert first["val_perplexity"] < 0.5 * first["random_val_perplexity"], first
    assert 0.0 <= first["facts"]["recall"] <= 1.0 and first["facts"]["n"] > 0
    assert 0.0 <= first["game"]["copy"] <= 1.0 and first["game"]["n"] > 0  # the renaming game in words
    assert first["game_bare"]["form"] == "bare colour word" and 0.0 <= first["game_bare"]["copy"] <= 1.0
    assert cfg.model.lm.path == first["path"] and cfg.model.lm.tokenizer == first["path"]

    again_cfg = lm_stage_cfg(tiny_world_dir, tmp_path)
    again = ensure_pretrained(again_cfg, progress=False)["lm"]
    assert not again["built_now"] and again["path"] == first["path"]  # reused, not rebuilt

    changed = ensure_pretrained(lm_stage_cfg(tiny_world_dir, tmp_path, "pretrain.lm.steps=61"), progress=False)
    assert changed["lm"]["path"] != first["path"]  # a different config is a different cache entry

    # the Flamingo wraps exactly the pretrained LM: zero gates give its logits
    from transformers import AutoModelForCausalLM

    model = build_flamingo(cfg.model).eval()
    saved = AutoModelForCausalLM.from_pretrained(first["path"]).eval()
    ids = model.tokenizer("<image>a red circle.<|endofchunk|>", return_tensors="pt")["input_ids"]
    images = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(ids, images=images).logits, saved(ids).logits, atol=1e-5)


def test_stages_are_skipped_for_given_or_reinitialised_parts(tiny_world_dir, tmp_path):
    cfg = lm_stage_cfg(tiny_world_dir, tmp_path, "model.lm.freeze=train_from_scratch")
    assert ensure_pretrained(cfg, progress=False) == {}  # re-initialised anyway: nothing to pretrain
    cfg = lm_stage_cfg(tiny_world_dir, tmp_path, "pretrain.lm.enabled=false")
    assert ensure_pretrained(cfg, progress=False) == {} and cfg.model.lm.path is None


def test_an_interrupted_build_leaves_no_cache(tiny_world_dir, tmp_path):
    from flamingo_lab.data.shards import load_world
    from flamingo_lab.pretrain.stages import ensure_stage

    world = load_world(tiny_world_dir)

    def broken(out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        ensure_stage("lm", {"a": 1}, world, tmp_path, broken)
    folder, report, built = ensure_stage("lm", {"a": 1}, world, tmp_path, lambda out: {"ok": True})
    assert built and report["ok"] and not (folder / "half.bin").exists()
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # where it was built
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


class _GameLM:
    """A stand-in causal LM for the renaming-game probe: it reads the prompt back and puts all its logit
    on one word: the word given to the query's colour (``bind``) or the first fresh word shown."""

    def __init__(self, tokenizer, bind: bool, bare: bool = False):
        self.tokenizer, self.bind, self.bare = tokenizer, bind, bare

    def eval(self):
        return self

    def __call__(self, input_ids):
        import re
        from types import SimpleNamespace

        text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        named = "" if self.bare else r" \w+ in the [\w ]+?\."  # the bare form: the colour word alone
        item = r"(red|green|blue|yellow|purple)" + named + r" question : what colour is it\? answer :"
        items, query = re.findall(item + r" (\w+)", text), re.findall(item + "$", text)  # (the tokenizer lowercases)
        assert len(items) == 4 and len(query) == 1, text
        word = dict(items)[query[0]] if self.bind else items[0][1]
        logits = torch.zeros(1, input_ids.shape[1], len(self.tokenizer))
        logits[0, -1, self.tokenizer.convert_tokens_to_ids(word)] = 1.0
        return SimpleNamespace(logits=logits)


def test_game_probe_tells_binding_from_repeating_a_word_shown(tiny_world_dir):
    """The LM stage's in-context check: an LM that binds each fresh word to its colour copies the right
    one every time; one that repeats a word it was shown is right about as often as a guess among them."""
    from flamingo_lab.data.shards import load_world, load_world_tokenizer
    from flamingo_lab.pretrain.lm import game_copy

    world, tokenizer = load_world(tiny_world_dir), load_world_tokenizer(tiny_world_dir)
    binds = game_copy(_GameLM(tokenizer, bind=True), tokenizer, world["config"], n=60)
    repeats = game_copy(_GameLM(tokenizer, bind=False), tokenizer, world["config"], n=60)
    assert binds["copy"] == 1.0 and binds["n"] == 60
    assert 0.15 < repeats["copy"] < 0.7 and abs(repeats["copy"] - repeats["guess_among_shown"]) < 0.2, repeats
    assert game_copy(_GameLM(tokenizer, bind=True), tokenizer, None) is None  # imported worlds: no generator
    # the bare form: each item's colour is one word where the image stands (the stand-in asserts the form)
    bare = game_copy(_GameLM(tokenizer, bind=True, bare=True), tokenizer, world["config"], n=60, bare=True)
    assert bare["copy"] == 1.0 and bare["form"] == "bare colour word"
    repeats = game_copy(_GameLM(tokenizer, bind=False, bare=True), tokenizer, world["config"], n=60, bare=True)
    assert abs(repeats["copy"] - repeats["guess_among_shown"]) < 0.2


def test_stages_learn_from_the_pretraining_world_and_refuse_one_without_the_flamingos_words(tiny_world_dir, tmp_path):
    """pretrain.data_root: the stages learn from (and are cached under) that world, whatever world the Flamingo
    trains on, so a study on a world with other video pairs reuses the stages of the world they were built on;
    a Flamingo world writing words the stages' tokenizer lacks is refused, naming them (they would read as [UNK])."""
    import json
    import shutil

    pre, flamingo = tmp_path / "pre", tmp_path / "flamingo"
    shutil.copytree(tiny_world_dir, pre)
    shutil.copytree(tiny_world_dir, flamingo)
    stage = ["pretrain.lm.enabled=true", "pretrain.lm.steps=3", "pretrain.lm.batch_size=4", "pretrain.lm.seq_len=16",
             "pretrain.lm.bf16=false"]
    cfg = compose(["scale=tiny", f"data.root={flamingo}", f"pretrain.data_root={pre}", *stage])
    first = ensure_pretrained(cfg, progress=False)["lm"]
    assert first["built_now"] and Path(first["path"]).parent == pre / "cache"  # the stages' world's cache
    assert cfg.model.lm.tokenizer == first["path"]  # the Flamingo reads its world with the LM's tokenizer
    assert not (flamingo / "cache").exists()
    on_its_own = compose(["scale=tiny", f"data.root={pre}", *stage])  # the same stage as the world's own
    again = ensure_pretrained(on_its_own, progress=False)["lm"]
    assert not again["built_now"] and again["path"] == first["path"]

    tok = json.loads((flamingo / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["zebra"] = max(vocab.values()) + 1  # a word the pretraining world never wrote
    (flamingo / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"1 word\(s\) that the tokenizer of the pretraining world.*\('zebra'\)"):
        ensure_pretrained(compose(["scale=tiny", f"data.root={flamingo}", f"pretrain.data_root={pre}", *stage]),
                          progress=False)
    scratch = compose(["scale=tiny", f"data.root={flamingo}", f"pretrain.data_root={pre}", *stage,
                       "model.lm.freeze=train_from_scratch"])
    assert ensure_pretrained(scratch, progress=False) == {}  # no pretrained LM: its own world's tokenizer
    assert scratch.model.lm.tokenizer == f"{flamingo}/tokenizer"
