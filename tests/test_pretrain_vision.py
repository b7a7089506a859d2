"""The vision pretraining stage at the tiny scale: its checkpoint loads into the encoder the Flamingo
builds, its report holds the zero-shot check, training learns, and the stage is cached."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from flamingo_lab.data.shards import load_world
from flamingo_lab.models.config import VisionConfig
from flamingo_lab.models.vision import VisionEncoder, create_timm_model
from flamingo_lab.pretrain.vision import pretrain_vision

TINY_VISION = {"name": "tiny", "size": "small", "image_size": 32, "timm_kwargs": {}}
FAST = {"objective": "both", "steps": 40, "batch_size": 16, "lr": 3e-3, "seed": 0, "bf16": False,
        "warmup": 5, "text_width": 32, "embed_dim": 32, "n_eval": 20}


@pytest.fixture(scope="module")
def world(tiny_world_dir):
    return load_world(tiny_world_dir)


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    """(out_dir, report) of one short pretraining run of the tiny encoder."""
    out = tmp_path_factory.mktemp("vision")
    return out, pretrain_vision(TINY_VISION, world, FAST, out, progress=False)


def test_checkpoint_loads_into_the_encoder_with_matching_keys(pretrained):
    from safetensors.torch import load_file

    out, _ = pretrained
    path = out / "encoder.safetensors"
    saved = load_file(str(path))
    model = create_timm_model(VisionConfig(**TINY_VISION, checkpoint=str(path)))  # fails on any key/shape mismatch
    assert set(saved) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fresh = create_timm_model(VisionConfig(**TINY_VISION))
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())  # trained, not the init
    enc = VisionEncoder(VisionConfig(**TINY_VISION, checkpoint=str(path)))
    assert enc(torch.zeros(1, 1, 1, 3, 32, 32)).shape == (1, 1, 1, enc.num_tokens, enc.dim)


def test_report_holds_zero_shot_figures_and_chance(pretrained, world):
    _, report = pretrained
    zs = report["zero_shot"]
    cfg = world["config"]
    assert zs["chance"] == pytest.approx({"colour": 1 / len(cfg["colours"]), "shape": 1 / len(cfg["shapes"]),
                                          "both": 1 / (len(cfg["colours"]) * len(cfg["shapes"]))})
    for split in ("held_out", "seen"):
        assert zs[split]["n"] == FAST["n_eval"]
        for k in ("colour", "shape", "both"):
            assert 0.0 <= zs[split][k] <= 1.0
        assert zs[split]["both"] <= min(zs[split]["colour"], zs[split]["shape"])
    for k in ("steps", "train_seconds", "seconds", "parameters", "retrieval", "heads", "loss"):
        assert k in report
    assert report["steps"] == FAST["steps"]
    assert report["parameters"]["encoder"] == sum(p.numel() for p in create_timm_model(VisionConfig(**TINY_VISION)).parameters())


def test_training_lowers_the_losses(pretrained):
    _, report = pretrained
    loss = report["loss"]
    assert loss["contrastive_final"] < loss["contrastive_initial"] - 0.3
    assert loss["supervised_final"] < loss["supervised_initial"] - 0.3
    assert len(loss["curve_every_step"]) == FAST["steps"]


def test_supervised_objective_trains_the_text_tower_too(world, tmp_path):
    settings = {**FAST, "objective": "supervised", "steps": 3, "grey": 0.25, "scramble": 0.25}
    report = pretrain_vision(TINY_VISION, world, settings, tmp_path, progress=False)
    assert report["objective"] == "supervised" and report["heads"]["trained"]
    assert report["zero_shot"]["text_tower_trained_on"] == "detached encoder output"
    assert "colour" in report["zero_shot"]["held_out"]


def test_scrambled_cells_keep_their_colours_and_lose_their_shapes(world):
    """The shape-blind view: each cell of the 2x2 grid keeps exactly its pixels (so its colour target holds)
    in a new order (so its shape is gone); no pixel moves to another cell."""
    from flamingo_lab.data.world import WorldConfig, render_scene, sample_scene
    from flamingo_lab.data.shards import image_to_tensor
    from flamingo_lab.pretrain.vision import scramble_cells
    import random

    cfg = WorldConfig(**world["config"])
    rng = random.Random(0)
    x = torch.stack([image_to_tensor(render_scene(sample_scene(rng, cfg, n=4), cfg), 32) for _ in range(3)])
    y = scramble_cells(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for r in range(2):
        for c in range(2):
            cx, cy = (t[:, :, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].reshape(3, 3, -1) for t in (x, y))
            # the same pixels (as RGB triples) in the cell, in another order
            assert torch.equal(torch.sort(cx.sum(1) * 1e4 + cx[:, 0], -1).values, torch.sort(cy.sum(1) * 1e4 + cy[:, 0], -1).values)
            moved = (cx != cy).any(1).float().mean().item()
            assert moved > 0.3
    assert not torch.equal(y[0, :, :16, :16], scramble_cells(x, torch.Generator().manual_seed(1))[0, :, :16, :16])


def test_blind_views_cannot_exceed_the_batch(world, tmp_path):
    with pytest.raises(ValueError, match="grey \\+ permute \\+ scramble must be <= 1"):
        pretrain_vision(TINY_VISION, world, {**FAST, "permute": 0.5, "scramble": 0.6}, tmp_path, progress=False)


def test_unknown_objective_is_rejected(world, tmp_path):
    with pytest.raises(ValueError, match="objective must be one of"):
        pretrain_vision(TINY_VISION, world, {**FAST, "objective": "mae"}, tmp_path, progress=False)


def test_stage_is_cached_and_points_the_config_at_its_checkpoint(tiny_world_dir, world, tmp_path, monkeypatch):
    from flamingo_lab.pretrain import stages, vision

    calls = []
    real = vision.pretrain_vision

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vision, "pretrain_vision", counting)
    cfg = OmegaConf.create({
        "model": {"vision": {**TINY_VISION, "checkpoint": None}},
        "pretrain": {"cache_dir": str(tmp_path / "cache"), "vision": {"enabled": True, **FAST, "steps": 2}},
    })
    first = stages._vision_stage(cfg, world, progress=False)
    checkpoint = cfg.model.vision.checkpoint
    assert first["built_now"] and len(calls) == 1
    assert checkpoint.endswith("encoder.safetensors")
    create_timm_model(VisionConfig(**OmegaConf.to_container(cfg.model.vision)))  # loads the cached weights

    cfg.model.vision.checkpoint = None  # a second run with the same config
    second = stages._vision_stage(cfg, world, progress=False)
    assert not second["built_now"] and len(calls) == 1  # reused, not rebuilt
    assert cfg.model.vision.checkpoint == checkpoint
    assert second["zero_shot"]["chance"] == first["zero_shot"]["chance"]


def test_damaged_pair_shards_are_skipped_counted_and_reported(world, tmp_path, caplog):
    """A shard cut short (in a member header: tarfile alone ends it quietly) and a pair without its caption
    are left out, counted per reason in load_pairs and in the stage's report, never silently dropped."""
    import copy
    import logging
    import tarfile

    from transformers import AutoTokenizer

    from flamingo_lab.pretrain.vision import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    first, second = world["shards"]["train"]["ltip"][:2]
    whole = load_pairs(world, "train", ["ltip"], tokenizer, 32, 16)
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    cut = tmp_path / "ltip-cut.tar"  # cut 100 bytes into the header of the third pair's first member
    cut.write_bytes(open(first, "rb").read()[: members[6].offset + 100])
    lost = len({m.name.split(".")[0] for m in members}) - 1  # the second pair goes with the lost tail (as in training)
    no_caption = tmp_path / "ltip-nocaption.tar"
    with tarfile.open(second) as src, tarfile.open(no_caption, "w") as dst:
        caption = next(m.name for m in src.getmembers() if m.name.endswith(".txt"))  # the first pair's
        for m in src.getmembers():
            if m.name != caption:
                dst.addfile(m, src.extractfile(m))
    damaged = copy.deepcopy(world)
    damaged["shards"]["train"]["ltip"] = [str(cut), str(no_caption)] + world["shards"]["train"]["ltip"][2:]
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs(damaged, "train", ["ltip"], tokenizer, 32, 16)
    assert pairs["skipped"] == {"corrupt_tar": 1, "missing_text": 1}
    assert len(pairs["images"]) == len(whole["images"]) - lost - 1
    assert whole["skipped"] == {}
    assert any("ltip-cut.tar" in r.getMessage() and "end-of-archive" in r.getMessage() for r in caplog.records)
    assert any("2 train pairs skipped" in r.getMessage() and "flamingo-data" in r.getMessage() for r in caplog.records)

    report = pretrain_vision(TINY_VISION, damaged, {**FAST, "steps": 2, "sources": ["ltip"]}, tmp_path,
                             progress=False)
    assert report["skipped"]["train"] == {"corrupt_tar": 1, "missing_text": 1} and report["skipped"]["val"] == {}


def test_text_mask_keeps_real_tokens_equal_to_pad():
    """A tokenizer whose pad token is its eos (GPT-2, Llama, SmolLM once prepared) writes eos into real text:
    the mask follows each text's length, not `ids != pad`."""
    from flamingo_lab.pretrain.vision import encode_texts

    class EosIsPad:
        pad_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, *(5 + len(w) for w in text.split()), 2]}  # bos, words, eos

    ids, mask = encode_texts(EosIsPad(), ["a red circle", "a big blue square"], text_len=8)
    assert ids[0].tolist() == [1, 6, 8, 11, 2, 2, 2, 2]
    assert mask.sum(1).tolist() == [5, 6]  # eos counted; before: 4 and 5 (the eos masked with the padding)
    assert mask[0].tolist() == [True] * 5 + [False] * 3
