"""Real weights by local path (issue 6): any Hugging Face causal LM folder, timm / open_clip visual weights.

Everything is tiny and made here: a tokenizer trained with `tokenizers` (without Flamingo's special
tokens), a Hugging Face model built from a config, both saved to a temporary folder and loaded through
``model.lm.path``; vision weights written as timm and open_clip state dicts.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flamingo_lab.config import compose
from flamingo_lab.data.shards import Tokenise
from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from flamingo_lab.models import VisionConfig, build_flamingo
from flamingo_lab.models.vision import VisionEncoder

CORPUS = [
    "a red circle.",
    "two blue squares left of a green triangle!",
    "the small yellow star is above the big purple circle.",
    "question: what colour is the circle? answer: red",
]

# Tokenizers in the style of each family, none with <image> or <|endofchunk|>:
#   llama:  sentencepiece-like BPE (Metaspace), <s> added by the post-processor, no pad;
#   gpt2:   byte-level BPE, <|endoftext|> for bos/eos/unk, no pad, no BOS added;
#   opt:    word-level, <pad> present, </s> is its BOS and is added by the post-processor;
#   smollm: byte-level BPE as gpt2 (SmolLM's is GPT-2-style), no pad, no BOS added.
TOKENIZERS = {
    "llama": dict(kind="metaspace", specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>",
                  pad=None, add_bos=True),
    "gpt2": dict(kind="bytelevel", specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>",
                 unk="<|endoftext|>", pad=None, add_bos=False),
    "opt": dict(kind="wordlevel", specials=["<s>", "<pad>", "</s>", "<unk>"], bos="</s>", eos="</s>",
                unk="<unk>", pad="<pad>", add_bos=True),
    "smollm": dict(kind="bytelevel", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None, add_bos=False),
}
ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=32, max_position_embeddings=64),
    # SmolLM: the Llama architecture with tied embeddings and grouped-query attention.
    "smollm": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=True),
}
KINDS = list(ARCHS)


def make_tokenizer(kind, specials, bos, eos, unk, pad, add_bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials)
    else:  # byte-level BPE
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """``saved_lm(kind)`` -> a folder holding a tiny pretrained-style LM of that family and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folders = {}

    def get(kind):
        if kind not in folders:
            tok = make_tokenizer(**TOKENIZERS[kind])
            assert MEDIA_TOKEN not in tok.get_vocab() and EOC_TOKEN not in tok.get_vocab()
            arch = dict(ARCHS[kind])
            ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), **ids, **arch)
            torch.manual_seed(0)
            lm = AutoModelForCausalLM.from_config(config)
            out = tmp_path_factory.mktemp(f"lm_{kind}")
            lm.save_pretrained(out)
            tok.save_pretrained(out)
            folders[kind] = out
        return folders[kind]

    return get


def build_from_path(folder, *overrides):
    cfg = compose(["scale=tiny", f"model.lm.path={folder}", f"model.lm.tokenizer={folder}", *overrides])
    torch.manual_seed(0)
    return build_flamingo(cfg.model)


def saved_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def batch(model, texts=("a red circle.", "two blue squares left of a green triangle!")):
    """A data-side batch of image-text pairs (the training path: BOS, EOS, padding, label masks)."""
    tokenise = Tokenise(model.tokenizer, seq_len=24, max_images=1, image_size=32)
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    rows = [tokenise({"jpg": img, "txt": t}, "pairs") for t in texts]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels", "images")}


# ------------------------------------------------------------------ language models by local path


@pytest.mark.parametrize("kind", KINDS)
def test_lm_path_loads_the_lm_its_tokenizer_and_the_special_tokens(saved_lm, kind):
    folder = saved_lm(kind)
    ref = saved_model(folder)
    vocab = ref.get_input_embeddings().num_embeddings
    model = build_from_path(folder)

    tok = model.tokenizer
    assert type(model.lm) is type(ref)
    assert {model.media_token_id, model.eoc_token_id} == {vocab, vocab + 1}  # new ids, new rows
    assert tok.convert_ids_to_tokens([vocab, vocab + 1]) == [MEDIA_TOKEN, EOC_TOKEN]
    assert tok.pad_token is not None and tok.pad_token != EOC_TOKEN

    # The grown tables: original rows bit-identical, new rows the mean of the old ones, ties kept.
    emb, head = model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == vocab + 2 == model.lm.config.get_text_config().vocab_size
    assert torch.equal(emb[:vocab], ref.get_input_embeddings().weight)
    assert torch.equal(head[:vocab], ref.get_output_embeddings().weight)
    assert torch.equal(emb[vocab:], ref.get_input_embeddings().weight.mean(0).expand(2, -1))
    tied = ref.get_input_embeddings().weight is ref.get_output_embeddings().weight
    assert tied == (kind != "llama")
    assert (emb is head) == tied

    # Zero gates: Flamingo's logits over the LM's own vocabulary are the saved LM's, images or not.
    ids = tok("the big purple circle is above a red star.", return_tensors="pt")["input_ids"]
    images = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits  # (1, L, vocab)
        torch.testing.assert_close(model(ids).logits[..., :vocab], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids, images=images).logits[..., :vocab], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_a_table_padded_past_the_vocabulary_gives_the_special_tokens_the_mean_row(tmp_path, kind):
    """Real OPT (50272 rows for 50265 tokens), Pythia, Qwen and Phi pad their tables: the special tokens get
    ids inside the table, on rows no text trained. They start as the vocabulary's mean row (as grown rows do),
    and every other row stays bit-identical."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer(**TOKENIZERS[kind])
    arch = dict(ARCHS[kind])
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    n_vocab, n_table = len(tok), len(tok) + 8
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=n_table, **ids, **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ref = saved_model(tmp_path)
    model = build_from_path(tmp_path)

    new = [model.media_token_id, model.eoc_token_id]
    assert new == [n_vocab, n_vocab + 1]  # inside the padded table: it does not grow
    emb, head = model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight
    old = [i for i in range(n_table) if i not in new]
    for got, want in ((emb, ref.get_input_embeddings().weight), (head, ref.get_output_embeddings().weight)):
        assert got.shape[0] == n_table
        assert torch.equal(got[old], want[old])
        torch.testing.assert_close(got[new], want[:n_vocab].mean(0).expand(2, -1), atol=0, rtol=0)
    # A tokenizer that already holds the tokens (a folder saved after preparation) keeps its trained rows.
    model.tokenizer.save_pretrained(tmp_path)
    again = build_from_path(tmp_path)
    assert torch.equal(again.lm.get_input_embeddings().weight, ref.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_lm_only_the_special_token_deltas_train(saved_lm, kind):
    model = build_from_path(saved_lm(kind))
    model.train()
    b = batch(model)
    assert (b["input_ids"] == model.media_token_id).any() and (b["input_ids"] == model.eoc_token_id).any()
    lm_before = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    deltas_before = {n: p.detach().clone() for n, p in model.special_embeddings.named_parameters()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = model(b["input_ids"], images=b["images"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    for n, p in model.lm.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, lm_before[n]), n  # the whole embedding matrix, new rows included
    for n, p in model.special_embeddings.named_parameters():
        assert not torch.equal(p, deltas_before[n]), f"special_embeddings.{n} did not train"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "smollm"])
def test_bos_once_and_padding_without_a_pad_token(saved_lm, kind):
    model = build_from_path(saved_lm(kind))
    tok = model.tokenizer
    if TOKENIZERS[kind]["pad"] is None:
        assert tok.pad_token == tok.eos_token  # GPT-2, Llama, SmolLM: padding borrows the eos token
    b = batch(model)
    ids, mask = b["input_ids"], b["attention_mask"]
    # The data side puts BOS first exactly once, whether or not the post-processor adds one.
    assert torch.all(ids[:, 0] == tok.bos_token_id)
    assert torch.all(ids[:, 1] != tok.bos_token_id)
    short = int(mask[0].sum())
    assert short < int(mask[1].sum()) and torch.all(mask[0, short:] == 0)
    assert torch.all(b["labels"][0, short:] == -100)
    # Right padding leaves the real tokens' logits as they are alone.
    with torch.no_grad():
        padded = model(ids, images=b["images"], attention_mask=mask).logits
        alone = model(ids[:1, :short], images=b["images"][:1]).logits
    torch.testing.assert_close(padded[:1, :short], alone, atol=1e-5, rtol=0)


def test_a_tokenizer_without_pad_eos_or_unk_gets_a_pad_token(tmp_path):
    from flamingo_lab.models.lm import prepare_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok))
    assert tok.convert_tokens_to_ids([MEDIA_TOKEN, EOC_TOKEN, "<pad>"]) == [3, 4, 5]
    assert tok(["a", "a b"], padding=True)["input_ids"][0] == [0, 5]


def test_growing_the_tables_is_deterministic_and_leaves_the_rng_alone(saved_lm):
    from flamingo_lab.models.lm import grow_token_embeddings

    folder = saved_lm("gpt2")
    a, b = build_from_path(folder).state_dict(), build_from_path(folder).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lm = saved_model(folder)
    n = lm.get_input_embeddings().num_embeddings
    state = torch.random.get_rng_state()
    grow_token_embeddings(lm, n + 3)
    assert torch.equal(torch.random.get_rng_state(), state)  # later parts initialise as without it
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight


# ------------------------------------------------------------------ vision weights: timm and open_clip

CLIP = dict(name="clip_vit_l14", size="small", image_size=32)  # a CLIP-style (pre-norm) timm ViT, 2 x 64 wide


def to_open_clip(timm_sd: dict[str, torch.Tensor], prefix="visual.") -> dict[str, torch.Tensor]:
    """A timm CLIP ViT state dict written in open_clip's (OpenAI CLIP's) layout, by hand."""
    blocks = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
              "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
              "mlp.fc2": "mlp.c_proj"}
    out = {}
    for k, v in timm_sd.items():
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)  # (1, 1, D) -> (D,)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]  # (1, 1 + N, D) -> (1 + N, D)
        elif k.startswith("patch_embed.proj."):
            k = k.replace("patch_embed.proj.", "conv1.")
        elif k.startswith(("norm_pre.", "norm.")):
            k = k.replace("norm_pre.", "ln_pre.").replace("norm.", "ln_post.")
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in blocks.items():
                rest = rest.replace(a, b)
            k = f"transformer.resblocks.{i}.{rest}"
        else:
            raise AssertionError(f"unexpected timm key {k}")
        out[prefix + k] = v.clone()
    width = timm_sd["cls_token"].shape[-1]
    out[prefix + "proj"] = torch.randn(width, 16)  # into the joint space: not part of the encoder
    return out


def text_tower(prefix="") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.randn(s) for k, s in {
        "token_embedding.weight": (50, 16), "positional_embedding": (8, 16), "ln_final.weight": (16,),
        "transformer.resblocks.0.attn.in_proj_weight": (48, 16), "text_projection": (16, 16),
        "logit_scale": ()}.items()}


def assert_same_encoder(a: VisionEncoder, b: VisionEncoder):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 1, 1, 3, a.cfg.image_size, a.cfg.image_size)
    assert torch.equal(a(x), b(x))


def test_open_clip_vit_checkpoint_loads_into_the_timm_vit(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = VisionEncoder(VisionConfig(**CLIP))
    assert "norm_pre.weight" in ref.model.state_dict()  # CLIP's ln_pre exists in this timm ViT
    visual = to_open_clip(ref.model.state_dict())
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.ln_post.bias",
            "visual.transformer.resblocks.1.attn.in_proj_weight"} <= set(visual)

    # A whole open_clip checkpoint as open_clip's trainer writes it: DDP prefix, state_dict wrapper.
    full = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in {**visual, **text_tower()}.items()}}
    torch.save(full, tmp_path / "epoch_3.pt")
    save_file(visual, tmp_path / "visual.safetensors")  # the visual tower alone
    for f in ("epoch_3.pt", "visual.safetensors"):
        torch.manual_seed(2)  # another random init, overwritten by the checkpoint
        assert_same_encoder(VisionEncoder(VisionConfig(**CLIP, checkpoint=str(tmp_path / f))), ref)


def test_open_clip_timm_trunk_and_plain_timm_checkpoints_load(tmp_path):
    torch.manual_seed(1)
    ref = VisionEncoder(VisionConfig(name="tiny"))
    sd = ref.model.state_dict()
    trunk = {**{f"visual.trunk.{k}": v for k, v in sd.items()}, "visual.head.proj.weight": torch.randn(16, 64),
             **text_tower("text.")}
    torch.save(trunk, tmp_path / "trunk.pt")
    torch.save({"model": sd}, tmp_path / "timm.pth")
    for f in ("trunk.pt", "timm.pth"):
        torch.manual_seed(2)
        assert_same_encoder(VisionEncoder(VisionConfig(name="tiny", checkpoint=str(tmp_path / f))), ref)


def test_open_clip_vit_at_another_image_size_resamples_the_position_embedding(tmp_path):
    torch.manual_seed(1)
    ref = VisionEncoder(VisionConfig(**CLIP))  # 32 px: a 4 x 4 grid
    torch.save(to_open_clip(ref.model.state_dict()), tmp_path / "clip.pt")
    big = VisionEncoder(VisionConfig(**{**CLIP, "image_size": 48}, checkpoint=str(tmp_path / "clip.pt")))
    assert big.num_tokens == 36 and big.model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(big.model.pos_embed[:, 0], ref.model.pos_embed[:, 0])  # the class token's
    own, other = big.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(own[k], other[k]) for k in own if k != "pos_embed")


def test_mismatched_vision_checkpoints_name_the_keys_and_shapes(tmp_path):
    torch.manual_seed(1)
    deeper = VisionEncoder(VisionConfig(**CLIP, timm_kwargs={"depth": 3}))
    torch.save(to_open_clip(deeper.model.state_dict()), tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match=r"read as an open_clip ViT checkpoint.*unexpected keys \['blocks\.2\."):
        VisionEncoder(VisionConfig(**CLIP, checkpoint=str(tmp_path / "deeper.pt")))

    narrow = VisionEncoder(VisionConfig(**CLIP, timm_kwargs={"embed_dim": 32}))
    torch.save(to_open_clip(narrow.model.state_dict()), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"shape mismatches \['cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)"):
        VisionEncoder(VisionConfig(**CLIP, checkpoint=str(tmp_path / "narrow.pt")))

    # The plain (non-CLIP) tiny ViT has no ln_pre, and its patch embedding has a bias.
    torch.save(to_open_clip(VisionEncoder(VisionConfig(**CLIP)).model.state_dict()), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \['patch_embed.proj.bias'\], 2 unexpected keys "
                                         r"\['norm_pre.bias', 'norm_pre.weight'\]"):
        VisionEncoder(VisionConfig(name="tiny", checkpoint=str(tmp_path / "clip.pt")))
    with pytest.raises(ValueError, match="loads only into a timm ViT"):
        VisionEncoder(VisionConfig(name="nfnet_f0", size="small", checkpoint=str(tmp_path / "deeper.pt")))

    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "rn50.pt")  # open_clip ResNet
    with pytest.raises(ValueError, match="neither a ViT .* nor a timm trunk"):
        VisionEncoder(VisionConfig(**CLIP, checkpoint=str(tmp_path / "rn50.pt")))


def test_vision_checkpoint_through_the_composed_config(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(1)
    ref = VisionEncoder(VisionConfig(**CLIP))
    torch.save({"state_dict": to_open_clip(ref.model.state_dict())}, tmp_path / "clip.pt")
    cfg = compose(["scale=tiny", "model/vision=clip_vit_l14", f"model.vision.checkpoint={tmp_path / 'clip.pt'}",
                   f"model.lm.tokenizer={tiny_tokenizer_dir}"])
    model = build_flamingo(cfg.model)
    assert_same_encoder(model.vision, ref)
