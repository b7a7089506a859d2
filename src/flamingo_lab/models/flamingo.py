"""Flamingo: a frozen vision encoder and a frozen LM, bridged by a resampler and gated cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN

from .config import FlamingoConfig
from .lm import (
    GraftHook,
    SpecialTokenDeltas,
    XAttnHook,
    build_lm,
    find_decoder_layers,
    load_tokenizer,
    xattn_layer_indices,
)
from .resampler import build_resampler
from .vision import VisionEncoder
from .xattn import build_graft_stack, build_xattn


def _activation_checkpointing(lm: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing -> is_activation_checkpointing
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), attr):
            return bool(getattr(lm, attr))
    return False


class Flamingo(nn.Module):
    def __init__(self, cfg: FlamingoConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.lm)
        self.media_token_id = self.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.eoc_token_id = self.tokenizer.convert_tokens_to_ids(EOC_TOKEN)

        self.vision = VisionEncoder(cfg.vision)
        if cfg.resampler.name != "perceiver" and cfg.resampler.n_latents > self.vision.num_tokens:
            raise ValueError(
                f"resampler '{cfg.resampler.name}' pools the {self.vision.num_tokens} visual tokens per image of "
                f"vision '{cfg.vision.name}' down to n_latents={cfg.resampler.n_latents}: choose "
                f"model.resampler.n_latents <= {self.vision.num_tokens}, a larger model.vision.image_size, "
                "or model/resampler=perceiver (its latents are learned queries)")
        self.resampler = build_resampler(cfg.resampler, self.vision.dim, self.vision.num_tokens)
        self.lm = build_lm(cfg.lm, self.tokenizer)

        self.lm_layers_name, layers = find_decoder_layers(self.lm)
        dim_lm = self.lm.get_input_embeddings().embedding_dim
        dim_lm = getattr(self.lm.config.get_text_config(), "hidden_size", dim_lm)
        dim_media = self.resampler.dim  # cross-attention reads the resampler's width
        blocks = xattn_layer_indices(len(layers), cfg.xattn.every)
        self._xattn_hooks, self._graft_hook = [], None
        if cfg.xattn.name == "grafting":
            # Nothing enters the LM; the new stack runs between its final hidden states and its head.
            self.xattn_layer_ids = []
            n = cfg.xattn.graft_layers if cfg.xattn.graft_layers is not None else max(2, len(blocks))
            head = self.lm.get_output_embeddings()
            if head is None:
                raise ValueError(f"xattn=grafting needs an LM with an output head; {type(self.lm).__name__} has none")
            # The stack reads what the head reads: not always hidden_size (OPT-350m projects 1024 -> 512 first).
            dim_head = getattr(head, "in_features", dim_lm)
            self.xattn_layers = build_graft_stack(cfg.xattn, dim_head, dim_media, n)
            self._graft_hook = GraftHook(self.xattn_layers)
            head.register_forward_pre_hook(self._graft_hook)
        else:
            # Cross-attention blocks live here; pre-hooks run them before the chosen LM layers.
            self.xattn_layer_ids = blocks
            self.xattn_layers = nn.ModuleList(build_xattn(cfg.xattn, dim_lm, dim_media) for _ in blocks)
            for i, block in zip(self.xattn_layer_ids, self.xattn_layers):
                hook = XAttnHook(block)
                layers[i].register_forward_pre_hook(hook, with_kwargs=True)
                self._xattn_hooks.append(hook)
        # Hugging Face's KV cache works with pre-hooked blocks (new tokens + media_offset); the grafted
        # stack's self-attention keeps no cache, so generation recomputes the whole sequence.
        self.supports_kv_cache = cfg.xattn.name != "grafting"

        # <image> and <|endofchunk|> rows that train while the LM is frozen.
        out_emb = self.lm.get_output_embeddings()
        self.special_embeddings = SpecialTokenDeltas(
            [self.media_token_id, self.eoc_token_id],
            dim_in=self.lm.get_input_embeddings().embedding_dim,
            dim_out=out_emb.in_features if out_emb is not None else dim_lm,
        )
        self.special_embeddings.attach(self.lm)

        if cfg.lm.freeze == "frozen":
            self.lock_lm()
        else:
            self.unlock_lm()

    # ------------------------------------------------------------ freezing

    def lock_lm(self) -> None:
        """Freeze every LM weight (embedding tables included) and keep the LM in eval mode."""
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.lm_locked = True

    def unlock_lm(self) -> None:
        self.lm.requires_grad_(True)
        self.lm.train(self.training)
        self.lm_locked = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()
        if self.lm_locked:
            self.lm.eval()  # a frozen LM runs without dropout
        return self

    # ------------------------------------------------------------ forward

    def encode_media(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, T_img, F, C, H, W)`` -> resampled visual tokens ``(B, T_img, n_latents, D)`` (D: resampler width)."""
        return self.resampler(self.vision(images))

    def text_to_media(self, input_ids: torch.Tensor, n_media: int, media_offset: torch.Tensor | None = None):
        """For each token the 1-based index of the latest ``<image>`` at or before it (0 = none).

        ``media_offset`` (B,) is the number of images already seen before ``input_ids`` (cached decoding:
        the new tokens continue the count of the prompt).
        """
        t2m = torch.cumsum(input_ids == self.media_token_id, dim=1)  # (B, L)
        if media_offset is not None:
            t2m = t2m + media_offset.to(t2m.device).view(-1, 1)  # (B, L)
        most = int(t2m[:, -1].max()) if t2m.numel() else 0
        if most > n_media:
            raise ValueError(f"a sample has {most} {MEDIA_TOKEN} tokens but images has only {n_media} "
                             "slots per sample (dim 1 of (B, T_img, F, C, H, W))")
        return t2m

    def forward(self, input_ids, images=None, attention_mask=None, labels=None, *, media=None,
                media_offset=None, **kw):
        """Hugging Face-style forward; ``images`` ``(B, T_img, F, C, H, W)``.

        ``media`` (already resampled, ``(B, T_img, n_latents, D)``, from :meth:`encode_media`) may be
        passed instead of ``images`` to reuse it (cached decoding, cached frozen features), with
        ``media_offset`` (B,) = images before ``input_ids`` when they continue a cached prompt.
        """
        t2m = None
        if images is not None and media is not None:
            raise ValueError("pass images or media (their encoding), not both")
        if images is not None or media is not None:
            if self.training and self._graft_hook is None and _activation_checkpointing(self.lm):
                raise NotImplementedError(
                    "gradient checkpointing of the LM layers would recompute them without the media "
                    "(the xattn pre-hooks are cleared after forward); disable it for now")
            if media is None:
                media = self.encode_media(images)  # (B, T_img, n_latents, D)
            t2m = self.text_to_media(input_ids, media.shape[1], media_offset)  # (B, L)
        if self._graft_hook is not None:
            return self._forward_grafted(input_ids, media, t2m, attention_mask, labels, **kw)
        for hook in self._xattn_hooks:
            hook.media, hook.text_to_media = media, t2m
        try:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        finally:
            for hook in self._xattn_hooks:
                hook.media = hook.text_to_media = None

    def _forward_grafted(self, input_ids, media, t2m, attention_mask, labels, **kw):
        past = kw.get("past_key_values")
        if past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else len(past)) > 0:
            raise ValueError("xattn=grafting has no KV cache (Flamingo.supports_kv_cache is False): pass the "
                             "whole sequence without past_key_values")
        keep = kw.pop("logits_to_keep", 0)  # the stack needs every position; slice the logits after
        if t2m is None:
            t2m = torch.zeros_like(input_ids)  # no images: cross-attention layers add nothing
        hook = self._graft_hook
        hook.armed, hook.media, hook.text_to_media, hook.attention_mask = True, media, t2m, attention_mask
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        finally:
            hook.armed, hook.media, hook.text_to_media, hook.attention_mask = False, None, None, None
        if isinstance(keep, int) and keep > 0:
            out.logits = out.logits[:, -keep:]
        return out

    @torch.no_grad()
    def generate(self, input_ids, images=None, attention_mask=None, **kw):
        """Greedy or beam decoding stopping at ``<|endofchunk|>`` (Hugging Face signature; returns prompt +
        new tokens), with a KV cache that keeps each new token on the latest image (models.generation)."""
        from .generation import generate

        return generate(self, input_ids, images, attention_mask, **kw)

    # ------------------------------------------------------------ reporting

    def gate_values(self) -> dict[str, float]:
        """``{"layer{i}/attn": tanh(alpha_xattn), "layer{i}/ffw": tanh(alpha_dense)}`` per inserted block
        (``graft{j}/...`` per grafted layer; vanilla has none)."""
        if self._graft_hook is not None:
            return {f"graft{j}/{k}": v for j, layer in enumerate(self.xattn_layers) for k, v in layer.gates().items()}
        return {f"layer{i}/{k}": v for i, block in zip(self.xattn_layer_ids, self.xattn_layers)
                for k, v in block.gates().items()}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The tanh gate scalars (alpha_xattn, alpha_dense) of every block, e.g. for their own LR."""
        return [p for n, p in self.xattn_layers.named_parameters() if n.rsplit(".", 1)[-1].startswith("alpha_")]

    def components(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "resampler": self.resampler, "xattn": self.xattn_layers,
                "lm": self.lm, "special_embeddings": self.special_embeddings}

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable``, ``frozen`` and ``<component>/total|trainable`` per component."""
        def count(params):
            params = list(params)
            return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

        total, trainable = count(self.parameters())
        out = {"total": total, "trainable": trainable, "frozen": total - trainable}
        for name, module in self.components().items():
            out[f"{name}/total"], out[f"{name}/trainable"] = count(module.parameters())
        return out
