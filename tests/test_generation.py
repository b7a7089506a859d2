"""Decoding (models/generation.py): the KV cache changes nothing, padding changes nothing, <EOC> stops."""

from __future__ import annotations

import pytest
import torch

from flamingo_lab.config import compose
from flamingo_lab.models import build_flamingo
from flamingo_lab.models.generation import continuation_logprobs, generate


@pytest.fixture(scope="module")
def model(tiny_tokenizer_dir):
    torch.manual_seed(0)
    m = build_flamingo(compose(["scale=tiny", f"model.lm.tokenizer={tiny_tokenizer_dir}"]).model)
    with torch.no_grad():
        for p in m.gate_parameters():  # open the gates: the images must matter
            p.fill_(1.0)
        for p in m.lm.parameters():  # a random LM at 0.02 scale is near-uniform: sharpen it
            p.mul_(4.0) if p.dim() > 1 else None
    return m.eval()


def prompts(model, texts):
    """Left-padded ids and mask for ``texts``."""
    tok = model.tokenizer
    ids = [tok(t)["input_ids"] for t in texts]
    L = max(map(len, ids))
    input_ids = torch.full((len(ids), L), tok.pad_token_id)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, L - len(x):] = torch.tensor(x)
        mask[i, L - len(x):] = 1
    return input_ids, mask


TEXTS = ["<image>output: a red circle.<|endofchunk|><image>output:",
         "question: what colour is the circle? answer: red<|endofchunk|><image>question: what colour"]


def test_kv_cache_gives_the_same_tokens_greedy_and_beam(model):
    torch.manual_seed(1)
    ids, mask = prompts(model, TEXTS)
    images = torch.randn(2, 2, 1, 3, 32, 32)  # (B, T_img, F, C, H, W); the second prompt uses one
    for beams in (1, 3):
        with_cache = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=8, num_beams=beams,
                              use_cache=True)
        without = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=8, num_beams=beams,
                           use_cache=False)
        assert with_cache.shape[1] > ids.shape[1]
        assert torch.equal(with_cache, without), (beams, with_cache, without)
        assert torch.equal(with_cache[:, : ids.shape[1]], ids)
        assert not (with_cache[:, ids.shape[1]:] == model.media_token_id).any()  # no new <image>


def test_model_without_kv_cache_support_recomputes(model, monkeypatch):
    ids, mask = prompts(model, TEXTS[:1])
    images = torch.randn(1, 2, 1, 3, 32, 32)
    ref = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=5)
    monkeypatch.setattr(model, "supports_kv_cache", False, raising=False)
    calls = []
    orig = model.lm.forward
    monkeypatch.setattr(model.lm, "forward", lambda *a, **kw: calls.append(kw.get("past_key_values")) or orig(*a, **kw))
    out = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(out, ref) and all(c is None for c in calls)


def test_left_padding_changes_nothing(model):
    torch.manual_seed(2)
    images = torch.randn(2, 2, 1, 3, 32, 32)
    ids, mask = prompts(model, TEXTS)
    batched = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=6)
    single_ids, single_mask = prompts(model, TEXTS[1:])
    single = generate(model, single_ids, images=images[1:], attention_mask=single_mask, max_new_tokens=6)
    n = single.shape[1] - single_ids.shape[1]
    assert torch.equal(batched[1, ids.shape[1]:ids.shape[1] + n], single[0, single_ids.shape[1]:])


def test_generation_stops_at_end_of_chunk(model):
    ids, mask = prompts(model, TEXTS[:1])
    images = torch.randn(1, 2, 1, 3, 32, 32)
    free = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=6)
    assert free.shape[1] <= ids.shape[1] + 6
    for beams in (1, 3):  # make the token greedy picks third the stop token: decoding ends there
        stop = int(free[0, ids.shape[1] + 2])
        out = generate(model, ids, images=images, attention_mask=mask, max_new_tokens=6, eos_token_id=stop,
                       num_beams=beams)
        new = out[0, ids.shape[1]:].tolist()
        assert len(new) <= 6
        if stop in new:  # nothing but padding after the stop token
            assert all(t == model.tokenizer.pad_token_id for t in new[new.index(stop) + 1:])
        if beams == 1:  # greedy: the free run, cut at the first stop token (included)
            ref = free[0, ids.shape[1]:].tolist()
            assert new == ref[: ref.index(stop) + 1]


def test_continuation_logprobs_match_a_plain_forward(model):
    ids, mask = prompts(model, TEXTS)
    images = torch.randn(2, 2, 1, 3, 32, 32)
    cont = torch.zeros_like(ids)
    cont[:, -3:] = 1
    got = continuation_logprobs(model, ids, mask, cont, images=images)
    for b in range(2):
        keep = mask[b].bool()
        x = ids[b, keep][None]
        logits = model(x, images=images[b:b + 1]).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        assert torch.allclose(got[b], logp[-3:].sum(), atol=1e-4)
