"""The frozen encoder's feature cache (model.vision.cache_mib): same tokens, each distinct frame encoded once."""

from __future__ import annotations

import pytest
import torch

from flamingo_lab.config import compose
from flamingo_lab.models.config import VisionConfig
from flamingo_lab.models.vision import FeatureCache, VisionEncoder


def encoder_pair(cache_mib: int = 4) -> tuple[VisionEncoder, VisionEncoder]:
    """The same tiny encoder (same weights) without and with a cache."""
    torch.manual_seed(0)
    plain = VisionEncoder(VisionConfig(name="tiny", size="small", image_size=32))
    cached = VisionEncoder(VisionConfig(name="tiny", size="small", image_size=32, cache_mib=cache_mib))
    cached.load_state_dict(plain.state_dict())
    return plain, cached


class CountingEncoder:
    """Wraps an encoder's token function and records how many frames it was asked to encode."""

    def __init__(self, enc: VisionEncoder):
        self.enc, self.frames = enc, 0
        self._tokens = enc._tokens
        enc._tokens = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.frames += len(x)
        return self._tokens(x)


def test_the_cache_gives_the_encoders_tokens_and_encodes_each_distinct_frame_once():
    plain, cached = encoder_pair()
    counter = CountingEncoder(cached)
    torch.manual_seed(1)
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    zero = torch.zeros(3, 32, 32)  # an empty image slot
    # (B=2, T_img=3, F=1): a appears twice, the empty slot three times
    images = torch.stack([torch.stack([a, b, zero]), torch.stack([zero, a, zero])])[:, :, None]
    want = plain(images)
    got = cached(images)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert counter.frames == 3  # a, b and the zero frame: once each
    stats = cached.cache.stats()
    assert (stats["misses"], stats["repeats"], stats["hits"], stats["entries"]) == (3, 3, 0, 3)

    again = cached(images)  # every frame from the cache: no encoding, the very tensors stored
    assert counter.frames == 3
    assert torch.equal(again, got)
    assert cached.cache.stats()["hits"] == 3

    changed = images.clone()
    changed[0, 1, 0, 0, 5, 5] += 1e-3  # one pixel of b: a different image, so a miss, never b's tokens
    out = cached(changed)
    assert counter.frames == 4
    assert torch.allclose(out, plain(changed), atol=1e-5)
    assert not torch.allclose(out[0, 1], got[0, 1], atol=1e-7)


def test_the_cache_keeps_within_its_size_and_drops_the_least_recently_used():
    tokens = {name: torch.full((2, 4), float(i)) for i, name in enumerate("abc")}  # 32 bytes each
    frames = {name: torch.full((1, 2, 2), float(i)) for i, name in enumerate("abc")}
    cache = FeatureCache(max_bytes=64)  # room for two entries
    calls = []

    def encoder(x):
        calls.append(len(x))
        return torch.stack([tokens["abc"[int(f[0, 0, 0])]] for f in x])

    cache.encode(torch.stack([frames["a"], frames["b"]]), encoder)
    cache.encode(frames["a"][None], encoder)  # a used: b is now the least recent
    cache.encode(frames["c"][None], encoder)  # c in, b out
    assert cache.stats()["evictions"] == 1 and cache.bytes == 64 and cache.stats()["entries"] == 2
    calls.clear()
    out = cache.encode(torch.stack([frames["a"], frames["c"], frames["b"]]), encoder)
    assert calls == [1]  # only b is encoded again
    assert torch.equal(out, torch.stack([tokens["a"], tokens["c"], tokens["b"]]))


def test_the_cache_keys_a_frame_by_its_bytes_shape_and_dtype():
    x = torch.zeros(1, 3, 4, 4)
    same = FeatureCache.keys(torch.zeros(2, 3, 4, 4))
    assert same[0] == same[1] == FeatureCache.keys(x)[0]
    assert FeatureCache.keys(torch.zeros(1, 3, 2, 8))[0] != FeatureCache.keys(x)[0]  # same bytes, other shape
    assert FeatureCache.keys(x.double())[0] != FeatureCache.keys(x)[0]
    assert FeatureCache.keys(x.bfloat16())[0] != FeatureCache.keys(x.half())[0]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_a_bad_cache_size_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="cache_mib must be a whole number of MiB >= 0"):
        VisionConfig(name="tiny", size="small", image_size=32, cache_mib=bad)


def test_a_run_with_the_cache_trains_as_one_without_and_reports_what_it_saved(tiny_world_dir, tmp_path):
    from flamingo_lab.training.run import config_key, train

    base = ["scale=tiny", f"data.root={tiny_world_dir}", "trainer.max_steps=8", "logger=none",
            "eval.tasks=[vqav2]", "eval.shots=[2]", "eval.max_items=8"]
    plain = train(compose(base), tmp_path / "plain")
    cached_cfg = compose([*base, "model.vision.cache_mib=64"])
    cached = train(cached_cfg, tmp_path / "cached")
    assert "vision_cache" not in plain
    assert cached["loss"]["first"] == pytest.approx(plain["loss"]["first"], rel=1e-5)
    assert cached["loss"]["final"] == pytest.approx(plain["loss"]["final"], rel=1e-3)
    assert cached["eval"]["overall_score"] == pytest.approx(plain["eval"]["overall_score"], abs=1e-6)
    stats = cached["vision_cache"]
    training, overall = stats["training"], stats["with_evaluation"]
    assert training["misses"] > 0 and training["hits"] + training["repeats"] > 0  # empty slots repeat at least
    assert overall["frames"] > training["frames"] and overall["hits"] + overall["repeats"] > training["hits"] + training["repeats"]
    # the setting is part of the run's identity, and its default leaves older runs' keys as they were
    assert config_key(cached_cfg) != config_key(compose(base)) == plain["config_key"]
    assert config_key(compose([*base, "model.vision.cache_mib=0"])) == plain["config_key"]


def test_flamingo_eval_sets_the_cache_and_scores_the_same(tiny_world_dir, tmp_path):
    """Evaluating a checkpoint with a cache (vision_cache_mib) gives the scores of one without; the support
    images that several prompts show are encoded once."""
    from flamingo_lab.eval.run import evaluate_checkpoint
    from flamingo_lab.training.run import train

    train(compose(["scale=tiny", f"data.root={tiny_world_dir}", "trainer.max_steps=4", "logger=none",
                   "eval.tasks=[vqav2]", "eval.shots=[2]", "eval.max_items=8"]), tmp_path / "run")
    from omegaconf import OmegaConf

    eval_cfg = {**OmegaConf.to_container(compose(["scale=tiny"]).eval, resolve=True),
                "tasks": ["vqav2", "msvdqa"], "shots": [2], "max_items": 8}
    plain = evaluate_checkpoint(tmp_path / "run", eval_cfg, tmp_path / "plain", progress=False)
    cached = evaluate_checkpoint(tmp_path / "run", eval_cfg, tmp_path / "cached", progress=False, vision_cache_mib=8)
    assert plain["vision_cache"] is None
    def scores(result):  # less the seconds each took
        return {t: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in by_k.items()}
                for t, by_k in result["eval"]["scores"].items()}

    assert scores(cached) == scores(plain) and scores(plain)["msvdqa"]["2"]["n"] == 8
    stats = cached["vision_cache"]
    assert stats["misses"] > 0 and stats["hits"] + stats["repeats"] > 0
    with pytest.raises(ValueError, match="vision_cache_mib must be a whole number of MiB"):
        evaluate_checkpoint(tmp_path / "run", eval_cfg, tmp_path / "bad", progress=False, vision_cache_mib=-1)
