"""Unit tests of flamingo_lab.models: the properties the paper promises, on tiny CPU models."""

from __future__ import annotations

import copy

import pytest
import torch

from flamingo_lab.models import (
    FlamingoConfig,
    ResamplerConfig,
    VisionConfig,
    XAttnConfig,
    build_flamingo,
    list_resamplers,
    list_vision_encoders,
    list_xattn,
    load_tokenizer,
    xattn_layer_indices,
)
from flamingo_lab.models.config import LMConfig
from flamingo_lab.models.resampler import PerceiverResampler
from flamingo_lab.models.vision import VisionEncoder
from flamingo_lab.models.xattn import GatedCrossAttentionBlock, MaskedCrossAttention

ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=4, n_head=2, n_positions=64),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=32, max_position_embeddings=64),
}
TINY_RESAMPLER = dict(dim=24, depth=2, n_latents=4, heads=2, dim_head=16, max_frames=4)
TINY_XATTN = dict(heads=2, dim_head=16)


def model_dict(tok_dir, arch="llama", **xattn):
    return {
        "name": "tiny",
        "vision": {"name": "tiny", "image_size": 32},
        "resampler": {"name": "perceiver", **TINY_RESAMPLER},
        "xattn": {"name": "gated", **TINY_XATTN, **xattn},
        "lm": {"arch": ARCHS[arch], "tokenizer": str(tok_dir)},
    }


def make_model(tok_dir, arch="llama", seed=0, **xattn):
    torch.manual_seed(seed)
    return build_flamingo(model_dict(tok_dir, arch, **xattn))


def set_gates(model, value=1.0):
    with torch.no_grad():
        for block in model.xattn_layers:
            block.alpha_xattn.fill_(value)
            block.alpha_dense.fill_(value)


def three_image_batch(model, seed=1):
    """Text ``w <image> w w <image> w w <image> w w``, 3 image slots."""
    g = torch.Generator().manual_seed(seed)
    m = model.media_token_id
    ids = torch.tensor([[5, m, 6, 7, m, 8, 9, m, 6, 5]])
    images = torch.randn(1, 3, 1, 3, 32, 32, generator=g)
    return ids, images


# ------------------------------------------------------------------ the zero gate leaves the LM unchanged


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_fresh_model_equals_bare_lm(tiny_tokenizer_dir, arch):
    model = make_model(tiny_tokenizer_dir, arch)
    ids, images = three_image_batch(model)
    with torch.no_grad():
        bare = model.lm(input_ids=ids).logits
        with_images = model(ids, images=images).logits
        no_images = model(ids).logits
    torch.testing.assert_close(with_images, bare, atol=1e-5, rtol=0)
    assert torch.equal(no_images, bare)
    # ...and the hooks do run: opened gates change the output.
    set_gates(model, 1.0)
    with torch.no_grad():
        assert not torch.allclose(model(ids, images=images).logits, bare, atol=1e-4)
        assert torch.equal(model.lm(input_ids=ids).logits, bare)  # the bare LM call ignores media


def test_loss_is_the_lms_shifted_cross_entropy(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    ids, images = three_image_batch(model)
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, images=images, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


# ------------------------------------------------------------------ image-causal masking


def test_changing_image_2_leaves_earlier_logits_unchanged(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    set_gates(model, 1.0)
    ids, images = three_image_batch(model)
    other = images.clone()
    other[:, 1] = torch.randn_like(other[:, 1])
    with torch.no_grad():
        a, b = model(ids, images=images).logits, model(ids, images=other).logits
    pos2 = (ids[0] == model.media_token_id).nonzero()[1].item()  # position of the 2nd <image>
    assert torch.equal(a[:, :pos2], b[:, :pos2])
    assert not torch.allclose(a[:, pos2:], b[:, pos2:])


def _block_and_inputs(attend):
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(XAttnConfig(attend=attend, **TINY_XATTN), dim=32, dim_media=24)
    with torch.no_grad():
        block.alpha_xattn.fill_(1.0)
        block.alpha_dense.fill_(1.0)
    y = torch.randn(2, 8, 32)
    media = torch.randn(2, 3, 4, 24)  # (B, T_img, n, D_v)
    t2m = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 3], [1, 1, 2, 2, 2, 3, 3, 3]])
    other = media.clone()
    other[:, 1] = torch.randn_like(other[:, 1])
    with torch.no_grad():
        return t2m, block(y, media, t2m), block(y, other, t2m)


def test_immediate_a_token_sees_only_its_latest_image():
    t2m, a, b = _block_and_inputs("immediate")
    changed = ~torch.isclose(a, b).all(-1)  # (B, L)
    assert torch.equal(changed, t2m == 2)


def test_all_previous_a_token_sees_every_earlier_image():
    t2m, a, b = _block_and_inputs("all_previous")
    changed = ~torch.isclose(a, b).all(-1)  # (B, L)
    assert torch.equal(changed, t2m >= 2)


@pytest.mark.parametrize("attend", ["immediate", "all_previous"])
def test_text_before_the_first_image_gets_exactly_zero(attend):
    torch.manual_seed(0)
    xattn = MaskedCrossAttention(dim=32, dim_media=24, heads=2, dim_head=16, attend=attend)
    t2m = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 2]])
    out = xattn(torch.randn(2, 4, 32), torch.randn(2, 2, 4, 24), t2m)
    assert torch.all(out[t2m == 0] == 0)
    assert torch.all(out[t2m > 0].abs().sum(-1) > 0)
    assert torch.isfinite(out).all()


def test_too_many_image_tokens_is_a_clear_error(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    ids, images = three_image_batch(model)
    with pytest.raises(ValueError, match="3 <image> tokens but images has only 2"):
        model(ids, images=images[:, :2])


# ------------------------------------------------------------------ freezing and training


def test_frozen_parts_get_no_gradient_and_trainable_parts_train(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    model.train()
    assert not model.lm.training and not model.vision.training and model.resampler.training
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm.") and "embed" in n for n in frozen)  # the embedding table is frozen
    assert all(n.startswith(("vision.", "lm.")) for n in frozen)
    assert all(n.startswith(("resampler.", "xattn_layers.", "special_embeddings.")) for n in trainable)

    ids, images = three_image_batch(model)
    ids[0, 3] = model.eoc_token_id
    # No weight decay: a parameter changes only if it got a gradient.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # step 1 opens the gates; then gradients reach xattn and the resampler
        opt.zero_grad()
        model(ids, images=images, labels=ids).loss.backward()
        opt.step()

    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), f"{n} did not train"
    assert all(v != 0 for v in model.gate_values().values())
    assert len(model.gate_parameters()) == 2 * len(model.xattn_layers) == 8


def test_gradient_checkpointing_is_refused_not_silently_wrong(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    enable = getattr(model.lm, "activation_checkpointing_enable", None) or model.lm.gradient_checkpointing_enable
    enable()
    model.train()
    ids, images = three_image_batch(model)
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(ids, images=images)


def test_unlock_lm_trains_the_lm(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    model.unlock_lm()
    model.train()
    assert model.lm.training
    assert all(p.requires_grad for p in model.lm.parameters())
    model.lock_lm()
    model.train()
    assert not model.lm.training
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_parameter_counts_add_up(tiny_tokenizer_dir):
    counts = make_model(tiny_tokenizer_dir).parameter_counts()
    parts = ["vision", "resampler", "xattn", "lm", "special_embeddings"]
    assert counts["trainable"] + counts["frozen"] == counts["total"]
    assert sum(counts[f"{p}/total"] for p in parts) == counts["total"]
    assert sum(counts[f"{p}/trainable"] for p in parts) == counts["trainable"]
    assert counts["vision/trainable"] == counts["lm/trainable"] == 0


def test_lm_state_dict_loads_into_a_bare_lm(tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    model = make_model(tiny_tokenizer_dir, "gpt2")
    bare = AutoModelForCausalLM.from_config(model.lm.config)
    bare.load_state_dict(model.lm.state_dict(), strict=True)


def test_deepcopy_keeps_hooks_with_their_copy(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir)
    clone = copy.deepcopy(model)
    set_gates(clone, 1.0)
    ids, images = three_image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images=images).logits, model.lm(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(clone(ids, images=images).logits, model(ids, images=images).logits)


# ------------------------------------------------------------------ special tokens


def test_missing_special_tokens_are_added_and_the_lm_resized(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(tmp_path)
    lm_cfg = {"arch": ARCHS["llama"], "tokenizer": str(tmp_path)}
    tokenizer = load_tokenizer(lm_cfg)
    assert "<image>" in tokenizer.get_vocab() and "<|endofchunk|>" in tokenizer.get_vocab()
    torch.manual_seed(0)
    model = build_flamingo(model_dict(tmp_path))
    assert model.lm.get_input_embeddings().num_embeddings >= len(tokenizer) == 7
    assert model.media_token_id >= 5 and model.eoc_token_id >= 5


# ------------------------------------------------------------------ configs and registries


def test_xattn_layer_indices():
    assert xattn_layer_indices(8, 1) == list(range(8))
    assert xattn_layer_indices(8, 2) == [0, 2, 4, 6]
    assert xattn_layer_indices(8, 4) == [0, 4]
    assert xattn_layer_indices(40, 4) == list(range(0, 40, 4))  # Flamingo-9B: 10 blocks
    assert len(xattn_layer_indices(80, 7)) == 12  # Flamingo-80B: 12 blocks
    assert xattn_layer_indices(8, "middle") == [4]
    assert xattn_layer_indices(8, [5, 1]) == [1, 5]


@pytest.mark.parametrize("bad", [0, -1, "first", [], [1, 1], [-1], 1.5, True])
def test_bad_every_is_rejected_with_a_fix(bad):
    with pytest.raises(ValueError, match="xattn.every must be >= 1, 'middle' or a list of layer indices"):
        XAttnConfig(every=bad)


def test_every_beyond_the_lm_is_rejected(tiny_tokenizer_dir):
    with pytest.raises(ValueError, match=r"lists layers \[9\] but the LM has 4 layers"):
        make_model(tiny_tokenizer_dir, every=[0, 9])


def test_every_middle_builds_one_block(tiny_tokenizer_dir):
    model = make_model(tiny_tokenizer_dir, every="middle", gating="none")
    assert model.xattn_layer_ids == [2] and len(model.xattn_layers) == 1
    assert model.gate_values() == {"layer2/attn": 1.0, "layer2/ffw": 1.0}


def test_unknown_names_list_the_valid_ones():
    assert list_vision_encoders() == ["clip_vit_l14", "nfnet_f0", "nfnet_f6", "tiny"]
    assert list_resamplers() == ["mlp", "perceiver", "transformer"]
    assert list_xattn() == ["gated", "grafting", "vanilla"]
    with pytest.raises(ValueError, match=r"unknown vision encoder 'nope'; choose one of \['clip_vit_l14', "):
        VisionConfig(name="nope")
    with pytest.raises(ValueError, match=r"resampler.name must be one of \['mlp', 'perceiver', 'transformer'\]"):
        ResamplerConfig(name="lstm")
    with pytest.raises(ValueError, match=r"xattn.name must be one of \['gated', 'grafting', 'vanilla'\]"):
        XAttnConfig(name="nope")
    with pytest.raises(ValueError, match=r"lm.freeze must be one of \['frozen', 'train_pretrained', "
                                         r"'train_from_scratch'\]"):
        LMConfig(freeze="thaw")


def test_from_dict_rejects_unknown_keys(tiny_tokenizer_dir):
    d = model_dict(tiny_tokenizer_dir)
    assert FlamingoConfig.from_dict(d).xattn.heads == 2
    with pytest.raises(ValueError, match=r"unknown model config keys \['visoin'\]; valid keys are"):
        FlamingoConfig.from_dict({**d, "visoin": {}})
    with pytest.raises(ValueError, match=r"unknown keys \['n_layers'\] in model.resampler; valid keys are .*'depth'"):
        FlamingoConfig.from_dict({**d, "resampler": {"n_layers": 2}})


def test_build_is_deterministic_and_takes_omegaconf(tiny_tokenizer_dir):
    a = make_model(tiny_tokenizer_dir, seed=3).state_dict()
    b = make_model(tiny_tokenizer_dir, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    omegaconf = pytest.importorskip("omegaconf")
    torch.manual_seed(3)
    c = build_flamingo(omegaconf.OmegaConf.create(model_dict(tiny_tokenizer_dir))).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------ vision encoder and resampler


def test_vision_encoder_vit_drops_prefix_tokens_and_stays_frozen():
    enc = VisionEncoder(VisionConfig(name="tiny", image_size=32))
    assert (enc.num_tokens, enc.dim) == (16, 64)  # (32 / 8)^2 patches, class token dropped
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 2, 3, 32, 32, requires_grad=True)
    out = enc(x)
    assert out.shape == (2, 3, 2, 16, 64) and not out.requires_grad


def test_vision_encoder_conv_grid_flattens():
    enc = VisionEncoder(VisionConfig(name="test_resnet", image_size=32))
    out = enc(torch.randn(1, 2, 1, 3, 32, 32))
    assert out.shape == (1, 2, 1, enc.num_tokens, enc.dim)


def test_vision_checkpoint_mismatch_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        VisionEncoder(VisionConfig(checkpoint=str(tmp_path / "missing.pt")))
    other = VisionEncoder(VisionConfig(name="tiny", timm_kwargs={"embed_dim": 32}))
    torch.save(other.model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="shape mismatches"):
        VisionEncoder(VisionConfig(checkpoint=str(tmp_path / "w.pt")))
    good = VisionEncoder(VisionConfig())
    torch.save({"state_dict": good.model.state_dict()}, tmp_path / "good.pt")
    loaded = VisionEncoder(VisionConfig(checkpoint=str(tmp_path / "good.pt")))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), good.parameters()))


@pytest.mark.parametrize("frames", [1, 3])
def test_resampler_shapes(frames):
    res = PerceiverResampler(ResamplerConfig(**TINY_RESAMPLER), dim_media=24)
    out = res(torch.randn(2, 3, frames, 5, 24))  # (B, T_img, F, N, D)
    assert out.shape == (2, 3, 4, 24)  # (B, T_img, n_latents, D)


def test_resampler_rejects_too_many_frames():
    res = PerceiverResampler(ResamplerConfig(**TINY_RESAMPLER), dim_media=24)
    with pytest.raises(ValueError, match="got 5 frames per image but resampler.max_frames is 4"):
        res(torch.randn(1, 1, 5, 3, 24))


def test_spatial_emb_tells_the_perceiver_where_each_token_is():
    """The paper's perceiver reads a frame's tokens as a set (no spatial encoding): the same tokens in another
    grid order give the same latents, so where an object is must be in the features' channels. With
    ``spatial_emb`` each grid position has its own learned embedding and the order matters."""
    x = torch.randn(2, 1, 1, 5, 24)  # (B, T_img, F, N, D_v)
    shuffled = x[:, :, :, [3, 0, 4, 1, 2]]
    torch.manual_seed(0)
    plain = PerceiverResampler(ResamplerConfig(**TINY_RESAMPLER), dim_media=24)
    torch.testing.assert_close(plain(x), plain(shuffled))
    torch.manual_seed(0)
    spatial = PerceiverResampler(ResamplerConfig(**TINY_RESAMPLER, spatial_emb=True), dim_media=24, n_tokens=5)
    assert spatial.spatial_emb.shape == (5, 24)
    assert (spatial(x) - spatial(shuffled)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="has 5 token positions but the vision encoder gave 4 tokens per frame"):
        spatial(torch.randn(1, 1, 1, 4, 24))
    with pytest.raises(ValueError, match="spatial_emb needs the vision encoder's number of tokens"):
        PerceiverResampler(ResamplerConfig(**TINY_RESAMPLER, spatial_emb=True), dim_media=24)
    with pytest.raises(ValueError, match="resampler.spatial_emb must be true or false"):
        ResamplerConfig(**TINY_RESAMPLER, spatial_emb="yes")


def test_lm_from_a_local_folder(tiny_tokenizer_dir, tmp_path):
    model = make_model(tiny_tokenizer_dir)
    model.lm.save_pretrained(tmp_path / "lm")
    model.tokenizer.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    d = model_dict(tiny_tokenizer_dir)
    d["lm"] = {"path": str(tmp_path / "lm"), "freeze": "train_pretrained"}
    loaded = build_flamingo(d)
    ids, _ = three_image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm(input_ids=ids).logits, model.lm(input_ids=ids).logits)
    assert loaded.parameter_counts()["lm/trainable"] == loaded.parameter_counts()["lm/total"]


@pytest.mark.parametrize("name", ["gated", "grafting"])
def test_no_parameter_is_a_0d_scalar_so_fsdp_can_shard_the_model(tiny_tokenizer_dir, name):
    """FSDP flattens parameters and refuses 0-d ones ("FSDP doesn't support scalar parameters", seen with
    trainer=fsdp on a GPU): the tanh gates are shape (1,) and still start at exactly 0."""
    model = make_model(tiny_tokenizer_dir, name=name)
    scalars = [n for n, p in model.named_parameters() if p.ndim == 0]
    assert not scalars, scalars
    gates = model.gate_parameters()
    assert gates and all(p.shape == (1,) and p.item() == 0.0 for p in gates)
    assert set(model.gate_values().values()) == {0.0}


@pytest.mark.parametrize("name", ["gated", "grafting"])
def test_lm_whose_head_is_narrower_than_its_layers(tiny_tokenizer_dir, name):
    """OPT-350m projects its 1024-wide hidden states to 512 before the output head (word_embed_proj_dim):
    the gated blocks read the layers' width, the grafted stack the head's. Zero gates give the bare LM,
    open gates change it, and a training step runs."""
    arch = dict(ARCHS["opt"], word_embed_proj_dim=16)  # layers 32 wide, embeddings and head 16 wide
    d = model_dict(tiny_tokenizer_dir, "opt", name=name)
    d["lm"]["arch"] = arch
    torch.manual_seed(0)
    model = build_flamingo(d)
    assert model.lm.get_output_embeddings().in_features == 16 != model.lm.config.hidden_size
    ids, images = three_image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images=images).logits, model.lm(input_ids=ids).logits,
                                   atol=1e-6, rtol=0)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.fill_(1.0)
    model.train()
    out = model(ids, images=images, labels=ids)
    with torch.no_grad():
        assert not torch.allclose(out.logits, model.lm(input_ids=ids).logits, atol=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in model.xattn_layers.parameters())


def test_feature_cache_does_not_serve_autocast_features_to_a_full_precision_call():
    """bf16-mixed training fills the cache at bf16 precision; the evaluation after it (no autocast) must
    compute its own features, as it would with the cache off, or cache_mib would change the scores."""
    torch.manual_seed(0)
    cached = VisionEncoder(VisionConfig(name="tiny", image_size=32, cache_mib=8))
    plain = VisionEncoder(VisionConfig(name="tiny", image_size=32))
    plain.load_state_dict(cached.state_dict())
    x = torch.randn(2, 1, 1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cached(x), plain(x))
    assert torch.equal(cached(x), plain(x))  # full precision: not the bf16 features of the call above
    assert cached.cache.stats()["misses"] == 4
