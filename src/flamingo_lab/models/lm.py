"""The language model side: any Hugging Face causal LM, its tokenizer, and where xattn goes in.

Nothing here changes the LM's own modules or state-dict keys: cross-attention blocks enter
through forward pre-hooks on the decoder layers, and the trainable rows of the special tokens
through forward hooks on the input and output embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN

from .config import LMConfig, check_every

SPECIAL_TOKENS = [MEDIA_TOKEN, EOC_TOKEN]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tokenizer and model


def load_tokenizer(cfg: LMConfig):
    """The LM's Hugging Face tokenizer, with ``<image>`` and ``<|endofchunk|>`` ensured."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer_path
    if path is None and cfg.path is None and isinstance(cfg.arch, dict) and cfg.arch.get("vocab_size"):
        return StandInTokenizer(int(cfg.arch["vocab_size"]))
    if path is None:
        raise ValueError("set lm.tokenizer (or lm.path) to a local tokenizer folder; "
                         "the LM's vocabulary and Flamingo's special tokens come from it "
                         "(or set lm.arch.vocab_size for a stand-in vocabulary, to count parameters)")
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))


def prepare_tokenizer(tok):
    """Add ``<image>`` and ``<|endofchunk|>`` where missing, and make sure there is a pad token.

    New tokens take the next ids (``len(tok)`` on), are never split and are skipped when decoding;
    ``build_lm`` grows the LM's tables to match. Padding (no pad token, as GPT-2 and Llama): the eos
    token, else unk, else a new ``<pad>``; padded positions are masked, so its value never matters,
    but it is never ``<|endofchunk|>`` (generation stops there). BOS is left as the tokenizer has it:
    where the tokenizer's post-processor adds none (GPT-2, SmolLM), the data side and the evaluation
    prompts put ``bos_token`` first themselves; a tokenizer without one starts text with no BOS.
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        n_before = len(tok)
        tok.add_tokens(missing, special_tokens=True)
        # build_lm initialises these rows: in an LM whose table is padded past its vocabulary (OPT, Pythia,
        # Qwen, Phi) they land on existing, never-trained rows rather than on rows the table grows
        tok.flamingo_added = (n_before, tok.convert_tokens_to_ids(missing))
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


class StandInTokenizer:
    """A vocabulary of ``vocab_size`` ids and no text: ``<image>`` and ``<|endofchunk|>`` are its last two ids.

    For paper-scale presets (no tokenizer file needed) on the meta device: parameter counts, shapes.
    It cannot encode text; give ``lm.tokenizer`` for that.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 4:
            raise ValueError(f"lm.arch.vocab_size must be >= 4; got {vocab_size}")
        self.vocab_size = vocab_size
        self._special = {MEDIA_TOKEN: vocab_size - 2, EOC_TOKEN: vocab_size - 1}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.pad_token, self.eos_token = "<pad>", "</s>"

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": 0, "<s>": 1, "</s>": 2, **self._special}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._special.get(token, self.get_vocab().get(token, 3))

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("the stand-in vocabulary (lm.tokenizer=null) cannot encode text; "
                                  "set lm.tokenizer to a local tokenizer folder")


def reinitialise(lm: nn.Module) -> None:
    """Re-draw every weight of a Hugging Face model with its own initialisation (train_from_scratch)."""
    with torch.no_grad():
        for module in lm.modules():
            for p in module.parameters(recurse=False):
                if hasattr(p, "_is_hf_initialized"):
                    p._is_hf_initialized = False
            lm._init_weights(module)
    if hasattr(lm, "tie_weights"):
        lm.tie_weights()


def build_lm(cfg: LMConfig, tokenizer) -> nn.Module:
    """A local pretrained LM (``cfg.path``) or a fresh one from ``cfg.arch``, sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path is not None:
        if cfg.tokenizer is not None and Path(cfg.tokenizer).resolve() != Path(cfg.path).resolve():
            log.warning("lm.tokenizer (%s) is not lm.path (%s): the LM reads the ids of that tokenizer, right "
                        "only if it has the LM's vocabulary (set model.lm.tokenizer to the LM's folder)",
                        cfg.tokenizer, cfg.path)
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)
    else:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type")
        vocab = arch.setdefault("vocab_size", len(tokenizer))
        if vocab < len(tokenizer):
            raise ValueError(f"lm.arch.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} "
                             "tokens); drop vocab_size from lm.arch to take it from the tokenizer")
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            arch.setdefault(k, getattr(tokenizer, k, None))
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arch))
    n_table = lm.get_input_embeddings().num_embeddings
    if n_table < len(tokenizer):
        grow_token_embeddings(lm, len(tokenizer))  # special tokens were added to the tokenizer
    added = getattr(tokenizer, "flamingo_added", None)
    if cfg.path is not None and added is not None:
        n_vocab, ids = added
        padding_rows = [i for i in ids if i < n_table]  # table padded past the vocabulary: rows that exist
        if padding_rows:
            init_token_rows(lm, padding_rows, n_vocab)
    if cfg.freeze == "train_from_scratch":
        reinitialise(lm)  # same architecture, pretrained weights (if any) discarded
    return lm


def grow_token_embeddings(lm: nn.Module, n_tokens: int) -> None:
    """Grow the LM's token tables to ``n_tokens`` rows for the tokens the tokenizer gained.

    The existing rows stay bit-identical; every new row (input table, and the output table where it
    is not tied) is the mean of the existing rows, and a new output bias entry their mean bias:
    deterministic, and the "average token" (a new token's logit starts at the average logit). Tied
    tables stay one tensor. While the LM is frozen these rows stay as they are: the trainable
    ``SpecialTokenDeltas`` are added on top of them.
    """
    n_old = lm.get_input_embeddings().num_embeddings
    # Hugging Face draws the new rows at random (we overwrite them): keep the CPU RNG where it was,
    # so the parts built after the LM get the same initialisation whether or not the tables grew.
    with torch.random.fork_rng(devices=[]):
        lm.resize_token_embeddings(n_tokens, mean_resizing=False)
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    tables = [inp.weight] + ([out.weight] if out is not None and out.weight is not inp.weight else [])
    with torch.no_grad():
        for w in tables:  # (n_tokens, D)
            w[n_old:] = w[:n_old].mean(0, keepdim=True)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None and bias.shape[0] > n_old:
            bias[n_old:] = bias[:n_old].mean()


def init_token_rows(lm: nn.Module, rows: list[int], n_vocab: int) -> None:
    """Set the token rows ``rows`` (and their output rows and bias, where not tied) to the mean of the
    vocabulary's ``n_vocab`` rows, as :func:`grow_token_embeddings` does for rows it adds: for special tokens
    given ids inside a table padded past its vocabulary, whose rows no text ever trained. Other rows stay
    bit-identical."""
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    tables = [inp.weight] + ([out.weight] if out is not None and out.weight is not inp.weight else [])
    with torch.no_grad():
        for w in tables:  # (n_table, D)
            w[rows] = w[:n_vocab].mean(0, keepdim=True)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None:
            bias[rows] = bias[:n_vocab].mean()


# ---------------------------------------------------------------- decoder layers


def find_decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list of any HF causal LM: the longest ModuleList of one block class.

    (LlamaForCausalLM: ``model.layers``; GPT2LMHeadModel: ``transformer.h``; OPT: ``model.decoder.layers``.)
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"found no list of decoder layers in {type(lm).__name__}")
    return best


def xattn_layer_indices(n_layers: int, every: Any) -> list[int]:
    """LM layers that get a cross-attention block before them.

    ``n`` -> 0, n, 2n, ... ("every n-th layer starting at the first"); ``'middle'`` -> [n_layers // 2];
    a list -> itself, checked against ``n_layers``.
    """
    check_every(every)
    if isinstance(every, str):
        return [n_layers // 2]
    if isinstance(every, int):
        return list(range(0, n_layers, every))
    bad = [i for i in every if i >= n_layers]
    if bad:
        raise ValueError(f"xattn.every lists layers {bad} but the LM has {n_layers} layers (0..{n_layers - 1})")
    return sorted(every)


class XAttnHook:
    """Forward pre-hook on an LM layer: hidden_states <- block(hidden_states, media, text_to_media).

    A plain object (not a closure) so that ``copy.deepcopy`` and pickling of the model keep working.
    With no media set it does nothing, so the LM alone is the bare LM.
    """

    def __init__(self, block: nn.Module):
        self.block = block
        self.media: torch.Tensor | None = None
        self.text_to_media: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        if self.media is None:
            return None
        if args:
            args = (self.block_forward(args[0]), *args[1:])
        elif "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": self.block_forward(kwargs["hidden_states"])}
        else:
            raise RuntimeError(f"{type(module).__name__} was called without hidden_states")
        return args, kwargs

    def block_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != self.text_to_media.shape:
            raise ValueError(f"text_to_media {tuple(self.text_to_media.shape)} does not match the hidden "
                             f"states {tuple(hidden.shape)}: with a KV cache, pass only the new tokens and "
                             "media_offset (the images seen before them)")
        return self.block(hidden, self.media, self.text_to_media)


class GraftHook:
    """Forward pre-hook on the LM's output head (grafting): hidden <- stack(hidden, media, text_to_media).

    The LM's own layers run unchanged; the grafted stack sits between its final hidden states and the
    output head. Unarmed (a bare ``model.lm(...)`` call), it does nothing.
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.armed = False
        self.media: torch.Tensor | None = None
        self.text_to_media: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def __call__(self, module, args):
        if not self.armed:
            return None
        from .xattn import run_graft_stack

        hidden = args[0]  # (B, L, D)
        if hidden.shape[:2] != self.text_to_media.shape:
            raise ValueError(f"the grafted stack got hidden states {tuple(hidden.shape)} for text of shape "
                             f"{tuple(self.text_to_media.shape)}: it needs the whole sequence (no KV cache, "
                             "all logits)")
        return (run_graft_stack(self.layers, hidden, self.media, self.text_to_media, self.attention_mask),
                *args[1:])


# ---------------------------------------------------------------- special-token rows


class SpecialTokenDeltas(nn.Module):
    """Trainable rows for ``<image>`` and ``<|endofchunk|>`` on top of a frozen embedding table.

    ``delta_in`` is added to the input embedding of those ids and ``delta_out`` to the output
    embedding rows (so to their logits). Both start at zero: the LM's output is unchanged, and its
    own tables stay bit-identical and get no gradient.
    """

    def __init__(self, token_ids: list[int], dim_in: int, dim_out: int):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.delta_in = nn.Parameter(torch.zeros(len(token_ids), dim_in))  # (n_special, D_emb)
        self.delta_out = nn.Parameter(torch.zeros(len(token_ids), dim_out))  # (n_special, D_head)

    def attach(self, lm: nn.Module) -> list:
        handles = [lm.get_input_embeddings().register_forward_hook(InputEmbeddingHook(self))]
        out = lm.get_output_embeddings()
        if out is not None:
            handles.append(out.register_forward_hook(OutputEmbeddingHook(self)))
        return handles


class InputEmbeddingHook:
    def __init__(self, deltas: SpecialTokenDeltas):
        self.deltas = deltas

    def __call__(self, module, args, output):
        ids = args[0]  # (B, L)
        hit = (ids.unsqueeze(-1) == self.deltas.token_ids).to(output.dtype)  # (B, L, n_special)
        return output + hit @ self.deltas.delta_in.to(output.dtype)  # (B, L, D_emb)


class OutputEmbeddingHook:
    def __init__(self, deltas: SpecialTokenDeltas):
        self.deltas = deltas

    def __call__(self, module, args, output):
        hidden = args[0]  # (B, L, D_head)
        extra = hidden @ self.deltas.delta_out.to(hidden.dtype).T  # (B, L, n_special)
        return output.index_add(-1, self.deltas.token_ids, extra.to(output.dtype))  # (B, L, V)
