"""Every model axis of Table 3 as a config choice: compose, build, train a step, and the paper's promises."""

from __future__ import annotations

import pytest
import torch

from flamingo_lab.config import compose
from flamingo_lab.models import build_flamingo
from flamingo_lab.training.optim import parameter_groups

# One entry per choice of every group / axis (scale=tiny: 2 LM layers, 32 px images).
VARIANTS = {
    "vision=tiny": ["model/vision=tiny"],
    "vision=nfnet_f6": ["model/vision=nfnet_f6"],
    "vision=nfnet_f0": ["model/vision=nfnet_f0"],
    "vision=clip_vit_l14": ["model/vision=clip_vit_l14"],
    "resampler=perceiver": ["model/resampler=perceiver"],
    "resampler=mlp": ["model/resampler=mlp"],
    "resampler=transformer": ["model/resampler=transformer"],
    "xattn=gated": ["model/xattn=gated"],
    "xattn=vanilla": ["model/xattn=vanilla"],
    "xattn=grafting": ["model/xattn=grafting"],
    "grafting,gating=none": ["model/xattn=grafting", "model.xattn.gating=none"],
    "gating=none": ["model.xattn.gating=none"],
    "every=2": ["model.xattn.every=2"],
    "every=middle": ["model.xattn.every=middle"],
    "every=[1]": ["model.xattn.every=[1]"],
    "attend=all_previous": ["model.xattn.attend=all_previous"],
    "grafting,all_previous": ["model/xattn=grafting", "model.xattn.attend=all_previous"],
    "lm=gpt2": ["model/lm=gpt2"],
    "freeze=train_pretrained": ["model.lm.freeze=train_pretrained"],
    "freeze=train_from_scratch": ["model.lm.freeze=train_from_scratch"],
}
GATED_KINDS = ["gated", "grafting"]  # the kinds with tanh gates


def build(tok_dir, *overrides, seed=0):
    cfg = compose(["scale=tiny", f"model.lm.tokenizer={tok_dir}", *overrides])
    torch.manual_seed(seed)
    return build_flamingo(cfg.model), cfg


def batch(model, frames=1, seed=1):
    """Two samples, text ``w <image> w w <image> w w``, two image slots of ``frames`` frames each."""
    g = torch.Generator().manual_seed(seed)
    m = model.media_token_id
    ids = torch.tensor([[5, m, 6, 7, m, 8, 9], [6, 7, m, 8, 5, m, 9]])
    size = model.cfg.vision.image_size
    return ids, torch.randn(2, 2, frames, 3, size, size, generator=g)


def open_gates(model, value=1.0):
    with torch.no_grad():
        for p in model.gate_parameters():
            p.fill_(value)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_choice_builds_and_trains_a_step_on_video(overrides, tiny_tokenizer_dir):
    model, cfg = build(tiny_tokenizer_dir, *overrides)
    model.train()
    ids, images = batch(model, frames=3)  # video: 3 frames per clip
    labels = ids.masked_fill(ids == model.media_token_id, -100)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("vision.") or n.startswith("lm.") for n in frozen)  # vision always frozen
    assert any(n.startswith("vision.") for n in frozen)
    assert any(n.startswith("lm.") for n in frozen) == (cfg.model.lm.freeze == "frozen")

    opt = torch.optim.AdamW(parameter_groups(model, cfg.optim), lr=1e-2)
    for _ in range(2):  # step 1 opens the gates; step 2 reaches what is behind them
        opt.zero_grad()
        out = model(ids, images=images, labels=labels)
        assert out.logits.shape == (*ids.shape, model.lm.config.vocab_size)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:  # frozen parts are untouched by a training step
            assert p.grad is None and torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any(n.startswith("resampler.") for n in changed) and any(n.startswith("xattn_layers.") for n in changed)


@pytest.mark.parametrize("kind", GATED_KINDS)
def test_zero_gates_give_the_bare_lm(kind, tiny_tokenizer_dir):
    model, _ = build(tiny_tokenizer_dir, f"model/xattn={kind}")
    ids, images = batch(model, frames=2)
    with torch.no_grad():
        bare = model.lm(input_ids=ids).logits
        torch.testing.assert_close(model(ids, images=images).logits, bare, atol=1e-5, rtol=0)
        open_gates(model)
        assert not torch.allclose(model(ids, images=images).logits, bare, atol=1e-4)
        assert torch.equal(model.lm(input_ids=ids).logits, bare)  # a bare LM call runs nothing new


@pytest.mark.parametrize("overrides", [["model/xattn=vanilla"], ["model.xattn.gating=none"],
                                       ["model/xattn=grafting", "model.xattn.gating=none"]])
def test_ungated_kinds_change_the_lm_from_the_start(overrides, tiny_tokenizer_dir):
    model, _ = build(tiny_tokenizer_dir, *overrides)
    ids, images = batch(model)
    assert all(v == 1.0 for v in model.gate_values().values())  # vanilla: no gates at all
    with torch.no_grad():
        assert not torch.allclose(model(ids, images=images).logits, model.lm(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("attend", ["immediate", "all_previous"])
@pytest.mark.parametrize("kind", ["gated", "vanilla", "grafting"])
def test_image_causal_masking(kind, attend, tiny_tokenizer_dir):
    """Text before an image never sees it; text before the first image sees no image at all."""
    model, _ = build(tiny_tokenizer_dir, f"model/xattn={kind}", f"model.xattn.attend={attend}")
    open_gates(model)
    ids, images = batch(model)
    other2, other_all = images.clone(), torch.randn_like(images)
    other2[:, 1] = torch.randn_like(other2[:, 1])
    with torch.no_grad():
        a, b, c = (model(ids, images=x).logits for x in (images, other2, other_all))
    first, second = ((ids == model.media_token_id).cumsum(1) >= k for k in (1, 2))  # (B, L)
    assert torch.equal(a[~second], b[~second]) and not torch.allclose(a[second], b[second])
    assert torch.equal(a[~first], c[~first])


@pytest.mark.parametrize("kind", ["vanilla", "grafting"])
def test_attend_modes_at_the_cross_attention(kind):
    """immediate: a token sees only its latest image; all_previous: every image up to it."""
    from flamingo_lab.models.config import XAttnConfig
    from flamingo_lab.models.xattn import GraftLayer, VanillaCrossAttentionBlock

    for attend, expect in [("immediate", lambda t: t == 2), ("all_previous", lambda t: t >= 2)]:
        torch.manual_seed(0)
        cfg = XAttnConfig(name=kind, gating="none", attend=attend, heads=2, dim_head=8)
        block = VanillaCrossAttentionBlock(cfg, 16, 12) if kind == "vanilla" else GraftLayer(cfg, 16, 12, "cross")
        y, media = torch.randn(1, 6, 16), torch.randn(1, 3, 2, 12)
        t2m = torch.tensor([[0, 1, 2, 2, 3, 3]])
        other = media.clone()
        other[:, 1] += 1.0
        with torch.no_grad():
            changed = ~torch.isclose(block(y, media, t2m), block(y, other, t2m)).all(-1)
        assert torch.equal(changed, expect(t2m)), attend


def test_grafting_leaves_the_lms_hidden_states_unchanged(tiny_tokenizer_dir):
    model, _ = build(tiny_tokenizer_dir, "model/xattn=grafting")
    open_gates(model)
    ids, images = batch(model)
    assert model.xattn_layer_ids == [] and len(model.xattn_layers) == 2  # 1 self + 1 cross (2 LM layers)
    assert [layer.kind for layer in model.xattn_layers] == ["self", "cross"]
    with torch.no_grad():
        ours = model(ids, images=images, output_hidden_states=True)
        bare = model.lm(input_ids=ids, output_hidden_states=True)
        last = model(ids, images=images, logits_to_keep=1).logits
    assert len(ours.hidden_states) == len(bare.hidden_states)
    for h, h0 in zip(ours.hidden_states, bare.hidden_states):
        assert torch.equal(h, h0)
    assert not torch.allclose(ours.logits, bare.logits, atol=1e-4)  # ...but the head reads the new stack
    torch.testing.assert_close(last, ours.logits[:, -1:])
    assert model.supports_kv_cache is False


def test_kv_cache_support_flag(tiny_tokenizer_dir):
    for kind, expected in [("gated", True), ("vanilla", True), ("grafting", False)]:
        model, _ = build(tiny_tokenizer_dir, f"model/xattn={kind}")
        assert model.supports_kv_cache is expected


def test_train_from_scratch_reinitialises_a_pretrained_lm(tiny_tokenizer_dir, tmp_path):
    model, _ = build(tiny_tokenizer_dir)
    model.lm.save_pretrained(tmp_path / "lm")
    model.tokenizer.save_pretrained(tmp_path / "lm")
    tuned, _ = build(tiny_tokenizer_dir, f"model.lm.path={tmp_path / 'lm'}", "model.lm.freeze=train_pretrained")
    fresh, _ = build(tiny_tokenizer_dir, f"model.lm.path={tmp_path / 'lm'}", "model.lm.freeze=train_from_scratch",
                     seed=5)
    ref = model.lm.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in tuned.lm.state_dict().items())
    weights = [k for k, v in ref.items() if v.ndim == 2]
    assert all(not torch.equal(fresh.lm.state_dict()[k], ref[k]) for k in weights)
    assert all(p.requires_grad for p in fresh.lm.parameters())


@pytest.mark.parametrize("resampler", ["perceiver", "mlp", "transformer"])
def test_resamplers_take_video_and_keep_shapes(resampler, tiny_tokenizer_dir):
    model, cfg = build(tiny_tokenizer_dir, f"model/resampler={resampler}")
    _, images = batch(model, frames=3)
    media = model.encode_media(images)
    assert media.shape == (2, 2, cfg.model.resampler.n_latents, cfg.model.resampler.dim)
    # time embeddings: the same frames in another order give other media
    assert not torch.allclose(media, model.encode_media(images.flip(2)))
    with pytest.raises(ValueError, match="got 9 frames per image but resampler.max_frames is 8"):
        model.encode_media(torch.randn(1, 1, 9, 3, 32, 32))


def test_matched_resampler_budgets_at_tiny_scale(tiny_tokenizer_dir):
    counts = {r: build(tiny_tokenizer_dir, f"model/resampler={r}")[0].parameter_counts()["resampler/total"]
              for r in ["perceiver", "mlp", "transformer"]}
    for r in ["mlp", "transformer"]:
        assert abs(counts[r] / counts["perceiver"] - 1) < 0.25, counts


@pytest.mark.parametrize("resampler", ["perceiver", "mlp", "transformer"])
def test_spatial_emb_trains_in_every_resampler_outside_the_budget(resampler, tiny_tokenizer_dir):
    plain, _ = build(tiny_tokenizer_dir, f"model/resampler={resampler}")
    model, _ = build(tiny_tokenizer_dir, f"model/resampler={resampler}", "model.resampler.spatial_emb=true")
    table = model.resampler.spatial_emb
    assert table.requires_grad and table.shape == (model.vision.num_tokens, model.vision.dim)
    # the same layers as without it (the matched budget ignores the table), plus the table
    extra = model.parameter_counts()["resampler/total"] - plain.parameter_counts()["resampler/total"]
    assert extra == table.numel()
    _, images = batch(model)
    model.encode_media(images).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_vision_families_are_ordered_like_the_papers(tiny_tokenizer_dir):
    n = {v: build(tiny_tokenizer_dir, f"model/vision={v}")[0].parameter_counts()["vision/total"]
         for v in ["nfnet_f6", "clip_vit_l14", "nfnet_f0"]}
    assert n["nfnet_f6"] > n["clip_vit_l14"] > n["nfnet_f0"], n


# ------------------------------------------------------------------ invalid choices fail early, listing valid ones


@pytest.mark.parametrize("overrides, message", [
    (["model/xattn=nope"], r"Available options in 'model/xattn':\s+gated\s+grafting\s+vanilla"),
    (["model/resampler=lstm"], r"Available options in 'model/resampler':\s+mlp\s+perceiver\s+transformer"),
    (["model/vision=resnet"], r"Available options in 'model/vision':\s+clip_vit_l14\s+nfnet_f0\s+nfnet_f6\s+tiny"),
    (["model.xattn.gating=sigmoid"], r"xattn.gating must be one of \['tanh', 'none'\]"),
    (["model.xattn.attend=latest"], r"xattn.attend must be one of \['immediate', 'all_previous'\]"),
    (["model.lm.freeze=thaw"], r"lm.freeze must be one of \['frozen', 'train_pretrained', 'train_from_scratch'\]"),
    (["model.vision.size=huge"], r"vision.size must be one of \['small', 'full'\]"),
    (["model.xattn.every=[99]"], r"xattn.every lists layers \[99\] but the LM has 2 layers \(0..1\)"),
    (["model.xattn.every=0"], r"xattn.every must be >= 1, 'middle' or a list of layer indices"),
    (["model/xattn=vanilla", "model.xattn.gating=tanh"], r"'vanilla' .* has no gate: set model.xattn.gating=none"),
    (["model/xattn=grafting", "model.xattn.graft_layers=1"], r"grafting needs at least 2 layers"),
    (["model.xattn.graft_layers=4"], r"graft_layers is for xattn=grafting only"),
    (["model/resampler=mlp", "model.resampler.n_latents=64"],
     r"pools the 16 visual tokens .* n_latents=64: choose model.resampler.n_latents <= 16"),
    (["model.resampler.layers=3"], r"resampler.layers=3 is for mlp/transformer"),
])
def test_impossible_choices_fail_at_compose_or_build(overrides, message, tiny_tokenizer_dir):
    with pytest.raises(Exception, match=message):
        build(tiny_tokenizer_dir, *overrides)


# ------------------------------------------------------------------ optimiser groups per part


def test_optimiser_groups_per_part(tiny_tokenizer_dir):
    model, cfg = build(tiny_tokenizer_dir, "model.lm.freeze=train_pretrained", "optim.gate_lr_mult=10",
                       "optim.dense_gate_lr_mult=2", "optim.groups.xattn.lr_mult=0.5",
                       "optim.groups.lm.weight_decay=0.01")
    groups = {g["name"]: g for g in parameter_groups(model, cfg.optim)}
    lr = cfg.optim.lr
    assert {n.split("/")[0] for n in groups} == {"resampler", "xattn", "gates", "dense_gates", "lm", "embeddings"}
    assert groups["resampler"]["weight_decay"] == 0.0  # paper: no weight decay on the resampler
    assert groups["gates/no_decay"]["lr"] == pytest.approx(10 * lr) and groups["gates/no_decay"]["weight_decay"] == 0
    # the cross-attention gates and the dense gates each get their own lr
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
            if any(p is q for q in groups["gates/no_decay"]["params"])} == {"alpha_xattn"}
    assert all(p.shape == (1,) for p in groups["dense_gates/no_decay"]["params"])
    assert len(groups["dense_gates/no_decay"]["params"]) == len(groups["gates/no_decay"]["params"])
    assert groups["dense_gates/no_decay"]["lr"] == pytest.approx(2 * lr)
    assert groups["xattn"]["lr"] == pytest.approx(0.5 * lr) and groups["xattn"]["weight_decay"] == 0.1
    assert groups["lm"]["weight_decay"] == 0.01 and groups["lm/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for name, g in groups.items() if not name.endswith("no_decay") for p in g["params"])
    ids = {id(p) for g in groups.values() for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}  # every trainable once
    assert sum(len(g["params"]) for g in groups.values()) == len(ids)
    with pytest.raises(ValueError, match=r"unknown optim.groups \['vision'\]; valid parts are"):
        parameter_groups(model, {**cfg.optim, "groups": {"vision": {}}})
