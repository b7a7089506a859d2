"""Decoding with a Flamingo: greedy and beam search stopping at ``<|endofchunk|>``, and scoring of
given continuations (for classification by log-likelihood).

Functions take the model, so ``Flamingo.generate`` is a one-line delegation. Prompts come
left-padded (``attention_mask`` 0 on the left); position ids are counted from each row's first
real token, so padding changes nothing.

The images are encoded once (``media``) and reused at every step. With a KV cache only the new
token is fed, with ``media_offset`` = the number of ``<image>`` tokens in the prompt, so it still
attends to the latest image (image-causal masking holds across the cache). A model whose
cross-attention cannot be cached (``model.supports_kv_cache`` False: the grafting variant)
recomputes the whole sequence at every step instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["generate", "continuation_logprobs"]


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, L)


class _Decoder:
    """Next-token logits for a growing batch of sequences, with or without a KV cache."""

    def __init__(self, model, media: torch.Tensor | None, use_cache: bool):
        self.model, self.media, self.use_cache = model, media, use_cache
        self.cache = None
        self.media_offset = None

    def _forward(self, ids, mask, positions, **kw):
        if self.media is None:
            return self.model(ids, attention_mask=mask, position_ids=positions, **kw)
        return self.model(ids, attention_mask=mask, position_ids=positions, media=self.media, **kw)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``(N, L)``; return the logits of the next token ``(N, V)``."""
        if not self.use_cache:
            return self._forward(ids, mask, _positions(mask)).logits[:, -1].float()
        out = self._forward(ids, mask, _positions(mask), use_cache=True)
        self.cache = out.past_key_values
        self.media_offset = (ids == self.model.media_token_id).sum(1)  # (N,) images seen in the prompt
        return out.logits[:, -1].float()

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``/``mask`` are the whole sequences so far; the last column is the new token."""
        if not self.use_cache:
            return self._forward(ids, mask, _positions(mask)).logits[:, -1].float()
        kw = {"past_key_values": self.cache, "use_cache": True}
        if self.media is not None:
            kw["media_offset"] = self.media_offset
        out = self._forward(ids[:, -1:], mask, _positions(mask)[:, -1:], **kw)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): the cache, the media and the offsets follow."""
        if self.media is not None:
            self.media = self.media.index_select(0, index)
        if self.media_offset is not None:
            self.media_offset = self.media_offset.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder_cache(index)


def _banned(model, logits: torch.Tensor) -> torch.Tensor:
    """No new ``<image>`` may be generated: there is no image for it."""
    logits[:, model.media_token_id] = float("-inf")
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    images: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    media: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    length_penalty: float = 1.0,
    use_cache: bool | None = None,
) -> torch.Tensor:
    """Greedy (``num_beams=1``) or beam search from left-padded prompts ``input_ids (B, L)``.

    ``images`` ``(B, T_img, F, C, H, W)`` (or their ``media`` from ``model.encode_media``). Stops at
    ``eos_token_id`` (default ``<|endofchunk|>``) or after ``max_new_tokens``. Returns ``(B, L + n)``
    as Hugging Face does: the prompt then the new tokens, the eos included, ``pad_token_id`` after it.
    Beam search scores a finished hypothesis by ``sum log p / len ** length_penalty`` and stops a
    prompt once it has ``num_beams`` finished hypotheses (HF ``early_stopping=True``).
    """
    if images is not None and media is not None:
        raise ValueError("pass images or media (their encoding), not both")
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"need max_new_tokens >= 1 and num_beams >= 1; got {max_new_tokens}, {num_beams}")
    eos = model.eoc_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else model.tokenizer.pad_token_id
    pad = eos if pad is None else pad
    if use_cache is None:
        use_cache = bool(getattr(model, "supports_kv_cache", True))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if images is not None:
        media = model.encode_media(images)  # (B, T_img, n_latents, D_v), once for every step
    if num_beams == 1:
        return _greedy(model, input_ids, attention_mask, media, max_new_tokens, eos, pad, use_cache)
    return _beam(model, input_ids, attention_mask, media, max_new_tokens, num_beams, eos, pad,
                 length_penalty, use_cache)


def _greedy(model, ids, mask, media, max_new_tokens, eos, pad, use_cache):
    dec = _Decoder(model, media, use_cache)
    logits = dec.prefill(ids, mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        tok = _banned(model, logits).argmax(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], 1)
        done |= tok == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = dec.step(ids, mask)
    return ids


def _beam(model, ids, mask, media, max_new_tokens, K, eos, pad, length_penalty, use_cache):
    B, L = ids.shape
    ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B*K, L)
    if media is not None:
        media = media.repeat_interleave(K, 0)  # (B*K, T_img, n_latents, D_v)
    dec = _Decoder(model, media, use_cache)
    logits = dec.prefill(ids, mask)
    scores = torch.full((B, K), float("-inf"), device=ids.device)
    scores[:, 0] = 0.0  # the K beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    gen = torch.empty(B * K, 0, dtype=torch.long, device=ids.device)  # (B*K, t)
    for t in range(max_new_tokens):
        logp = F.log_softmax(_banned(model, logits), -1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        next_rows, next_tok, next_scores = [], [], []
        for b in range(B):
            rows, toks, scs = [], [], []
            if not done[b]:
                for rank, (s, i) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
                    beam, tok = divmod(i, V)
                    if s == float("-inf"):
                        break
                    if tok == eos:
                        if rank < K:  # a finished hypothesis only counts among the best K
                            hyp = gen[b * K + beam].tolist() + [eos]
                            finished[b].append((s / len(hyp) ** length_penalty, hyp))
                        continue
                    rows.append(b * K + beam), toks.append(tok), scs.append(s)
                    if len(rows) == K:
                        break
                done[b] = len(finished[b]) >= K
            while len(rows) < K:  # a finished prompt (or too few candidates): padding beams
                rows.append(b * K), toks.append(pad), scs.append(float("-inf"))
            next_rows += rows
            next_tok += toks
            next_scores += scs
        index = torch.tensor(next_rows, device=ids.device)
        tok = torch.tensor(next_tok, device=ids.device)
        scores = torch.tensor(next_scores, device=ids.device).view(B, K)
        gen = torch.cat([gen.index_select(0, index), tok[:, None]], 1)
        ids = torch.cat([ids.index_select(0, index), tok[:, None]], 1)
        mask = torch.cat([mask.index_select(0, index), torch.ones_like(tok[:, None])], 1)
        if all(done) or t == max_new_tokens - 1:
            break
        dec.reorder(index)
        logits = dec.step(ids, mask)
    for b in range(B):  # prompts that ran out of steps: their live beams become hypotheses
        if not done[b]:
            for j in range(K):
                s = scores[b, j].item()
                if s > float("-inf"):
                    hyp = gen[b * K + j].tolist()
                    finished[b].append((s / max(len(hyp), 1) ** length_penalty, hyp))
    best = [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]
    n = max(len(h) for h in best) if best else 0
    out = torch.full((B, L + max(n, 0)), pad, dtype=torch.long, device=ids.device)
    out[:, :L] = ids[::K, :L]
    for b, h in enumerate(best):
        out[b, L:L + len(h)] = torch.tensor(h, dtype=torch.long, device=ids.device)
    return out


@torch.no_grad()
def continuation_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    continuation_mask: torch.Tensor,
    *,
    images: torch.Tensor | None = None,
    media: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of ``log p(token | everything before it)`` over the tokens where ``continuation_mask`` is 1.

    ``input_ids (N, L)`` hold prompt + continuation (left-padded); returns ``(N,)``. Used to rank
    class names: the class whose continuation is most likely wins.
    """
    if images is not None:
        media = model.encode_media(images)
    kw = {"media": media} if media is not None else {}
    logits = model(input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask), **kw).logits
    logp = F.log_softmax(logits[:, :-1].float(), -1)  # (N, L-1, V): predicts tokens 1..L-1
    target = input_ids[:, 1:]  # (N, L-1)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N, L-1)
    return (token_logp * continuation_mask[:, 1:].to(token_logp.dtype)).sum(-1)  # (N,)
