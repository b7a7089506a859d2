"""The shared pretraining stages: the LM stage learns the world's text, and stages are cached by config."""

from __future__ import annotations

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
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
