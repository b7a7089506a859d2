"""Flamingo: a frozen vision encoder and a frozen LM, bridged by a resampler and gated cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN

from .config import FlamingoConfig
from .lm import SpecialTokenDeltas, XAttnHook, build_lm, find_decoder_layers, load_tokenizer, xattn_layer_indices
from .resampler import build_resampler
from .vision import VisionEncoder
from .xattn import build_xattn


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
        self.resampler = build_resampler(cfg.resampler, self.vision.dim)
        self.lm = build_lm(cfg.lm, self.tokenizer)

        # Cross-attention blocks live here; pre-hooks run them before the chosen LM layers.
        self.lm_layers_name, layers = find_decoder_layers(self.lm)
        dim_lm = self.lm.get_input_embeddings().embedding_dim
        dim_lm = getattr(self.lm.config.get_text_config(), "hidden_size", dim_lm)
        self.xattn_layer_ids = xattn_layer_indices(len(layers), cfg.xattn.every)
        self.xattn_layers = nn.ModuleList(
            build_xattn(cfg.xattn, dim_lm, self.vision.dim) for _ in self.xattn_layer_ids
        )
        self._xattn_hooks = []
        for i, block in zip(self.xattn_layer_ids, self.xattn_layers):
            hook = XAttnHook(block)
            layers[i].register_forward_pre_hook(hook, with_kwargs=True)
            self._xattn_hooks.append(hook)

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
        """``(B, T_img, F, C, H, W)`` -> resampled visual tokens ``(B, T_img, n_latents, D_v)``."""
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

        ``media`` (already resampled, ``(B, T_img, n_latents, D_v)``, from :meth:`encode_media`) may be
        passed instead of ``images`` to reuse it (cached decoding, cached frozen features), with
        ``media_offset`` (B,) = images before ``input_ids`` when they continue a cached prompt.
        """
        t2m = None
        if images is not None and media is not None:
            raise ValueError("pass images or media (their encoding), not both")
        if images is not None or media is not None:
            if self.training and _activation_checkpointing(self.lm):
                raise NotImplementedError(
                    "gradient checkpointing of the LM layers would recompute them without the media "
                    "(the xattn pre-hooks are cleared after forward); disable it for now")
            if media is None:
                media = self.encode_media(images)  # (B, T_img, n_latents, D_v)
            t2m = self.text_to_media(input_ids, media.shape[1], media_offset)  # (B, L)
        for hook in self._xattn_hooks:
            hook.media, hook.text_to_media = media, t2m
        try:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        finally:
            for hook in self._xattn_hooks:
                hook.media = hook.text_to_media = None

    # ------------------------------------------------------------ reporting

    def gate_values(self) -> dict[str, float]:
        """``{"layer{i}/attn": tanh(alpha_xattn), "layer{i}/ffw": tanh(alpha_dense)}`` per block."""
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
