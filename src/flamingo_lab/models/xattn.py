"""Cross-attention from text to images, with the paper's image-causal masking.

Every block maps text ``y: (B, L, D_lm)``, media ``(B, T_img, n, D_media)`` (the resampler's width)
and ``text_to_media: (B, L)`` (1-based index of each token's latest ``<image>``, 0 = none yet) to a
new ``y: (B, L, D_lm)``. The kinds (Table 3 (iv)):

- ``gated``: GATED XATTN-DENSE inserted before chosen LM layers (the paper);
- ``vanilla``: the plain cross-attention of the original Transformer decoder (residual, no gate, no
  dense feed-forward) inserted at the same places;
- ``grafting``: nothing inserted in the LM; a new stack of alternating self-attention and
  cross-attention layers (each with a feed-forward) runs on the LM's final hidden states and feeds
  its output head. With ``gating=tanh`` each of its residual branches has a tanh gate initialised at
  0, so the model starts as the bare LM (as gated does); ``gating=none`` gives plain residuals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import XATTN, XAttnConfig
from .resampler import feed_forward


def gate_value(alpha: torch.Tensor) -> float:
    """tanh(alpha) of a gate parameter. Under FSDP2 (``trainer=fsdp``) a parameter is a DTensor sharded over the
    ranks (a rank may hold none of a shape-(1,) gate): its full value is gathered, a collective call that every
    rank makes at the same point (the gate logger and results.json do)."""
    alpha = alpha.detach()
    if hasattr(alpha, "full_tensor"):  # torch.distributed.tensor.DTensor
        alpha = alpha.full_tensor()
    return torch.tanh(alpha).item()


def media_mask(text_to_media: torch.Tensor, n_media: int, n_latents: int, attend: str) -> torch.Tensor:
    """Which media latents each token may see: bool ``(B, L, T_img*n)``, True = attend."""
    key_image = torch.arange(1, n_media + 1, device=text_to_media.device)
    key_image = key_image.repeat_interleave(n_latents)  # (T_img*n,): 1-based image of each key
    t2m = text_to_media.unsqueeze(-1)  # (B, L, 1)
    if attend == "immediate":
        return key_image == t2m  # (B, L, T_img*n)
    if attend == "all_previous":
        return key_image <= t2m  # (B, L, T_img*n); all False where t2m == 0
    raise ValueError(f"attend must be 'immediate' or 'all_previous'; got {attend!r}")


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of the images ``text_to_media`` allows."""

    def __init__(self, dim: int, dim_media: int, heads: int, dim_head: int, attend: str):
        super().__init__()
        self.heads, self.attend = heads, attend
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_media, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, y: torch.Tensor, media: torch.Tensor, text_to_media: torch.Tensor) -> torch.Tensor:
        B, T, n, _ = media.shape
        allowed = media_mask(text_to_media, T, n, self.attend)  # (B, L, T*n)
        has_media = allowed.any(-1, keepdim=True)  # (B, L, 1): False before the first image
        # SDPA gives NaN for an all-False row: let those rows see everything, then zero their output.
        allowed = allowed | ~has_media  # (B, L, T*n)
        q = self.to_q(y)  # (B, L, inner)
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B, T*n, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # (B, h, L, d)
        out = self.to_out(out.transpose(1, 2).flatten(-2))  # (B, L, D)
        return out * has_media.to(out.dtype)  # exactly zero where a token has no image yet


@XATTN.register("gated")
class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE (paper Figure 4), inserted before a frozen LM layer.

    y = y + tanh(alpha_xattn) * xattn(LN(y), media);  y = y + tanh(alpha_dense) * ffw(LN(y))
    """

    def __init__(self, cfg: XAttnConfig, dim: int, dim_media: int):
        super().__init__()
        self.gating = cfg.gating
        self.norm = nn.LayerNorm(dim)
        self.xattn = MaskedCrossAttention(dim, dim_media, cfg.heads, cfg.dim_head, cfg.attend)
        self.ffw = feed_forward(dim, cfg.ff_mult)  # LN -> Linear -> Squared ReLU -> Linear
        if cfg.gating == "tanh":
            # shape (1,), not a 0-d scalar: FSDP refuses 0-d parameters (found training with trainer=fsdp on a GPU)
            self.alpha_xattn = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the LM starts unchanged
            self.alpha_dense = nn.Parameter(torch.zeros(1))

    def gates(self) -> dict[str, float]:
        """The current gate values tanh(alpha) (1.0 for gating='none')."""
        if self.gating == "none":
            return {"attn": 1.0, "ffw": 1.0}
        return {"attn": gate_value(self.alpha_xattn), "ffw": gate_value(self.alpha_dense)}

    def forward(self, y: torch.Tensor, media: torch.Tensor, text_to_media: torch.Tensor) -> torch.Tensor:
        if self.gating == "none":
            y = y + self.xattn(self.norm(y), media, text_to_media)
            return y + self.ffw(y)
        y = y + torch.tanh(self.alpha_xattn) * self.xattn(self.norm(y), media, text_to_media)
        return y + torch.tanh(self.alpha_dense) * self.ffw(y)


@XATTN.register("vanilla")
class VanillaCrossAttentionBlock(nn.Module):
    """VANILLA XATTN: the Transformer decoder's cross-attention sub-layer, ``y = y + xattn(LN(y), media)``."""

    def __init__(self, cfg: XAttnConfig, dim: int, dim_media: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.xattn = MaskedCrossAttention(dim, dim_media, cfg.heads, cfg.dim_head, cfg.attend)

    def gates(self) -> dict[str, float]:
        return {}  # no gate

    def forward(self, y: torch.Tensor, media: torch.Tensor, text_to_media: torch.Tensor) -> torch.Tensor:
        return y + self.xattn(self.norm(y), media, text_to_media)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over the text, padding keys masked."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, y: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        L = y.shape[1]
        allowed = torch.ones(L, L, dtype=torch.bool, device=y.device).tril()  # (L, L) causal
        if attention_mask is not None:  # a query always sees itself, so no row is empty
            eye = torch.eye(L, dtype=torch.bool, device=y.device)
            allowed = allowed & (attention_mask.bool()[:, None, :] | eye)  # (B, L, L)
        q = self.to_q(y)  # (B, L, inner)
        k, v = self.to_kv(y).chunk(2, dim=-1)  # (B, L, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        mask = allowed.unsqueeze(1) if allowed.ndim == 3 else allowed  # (B, 1, L, L) or (L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, d)
        return self.to_out(out.transpose(1, 2).flatten(-2))  # (B, L, D)


class GraftLayer(nn.Module):
    """One layer of the grafted stack: a self- or cross-attention residual, then a feed-forward residual.

    y = y + g_attn * attn(LN(y));  y = y + g_ffw * ffw(y)   (g = tanh(alpha), alpha = 0 at init; 1 if gating=none)
    """

    def __init__(self, cfg: XAttnConfig, dim: int, dim_media: int, kind: str):
        super().__init__()
        self.kind, self.gating = kind, cfg.gating
        self.norm = nn.LayerNorm(dim)
        if kind == "self":
            self.attn = CausalSelfAttention(dim, cfg.heads, cfg.dim_head)
        else:
            self.attn = MaskedCrossAttention(dim, dim_media, cfg.heads, cfg.dim_head, cfg.attend)
        self.ffw = feed_forward(dim, cfg.ff_mult)
        if cfg.gating == "tanh":
            self.alpha_xattn = nn.Parameter(torch.zeros(1))  # the attention branch gate (shape (1,): FSDP)
            self.alpha_dense = nn.Parameter(torch.zeros(1))

    def gates(self) -> dict[str, float]:
        if self.gating == "none":
            return {"attn": 1.0, "ffw": 1.0}
        return {"attn": gate_value(self.alpha_xattn), "ffw": gate_value(self.alpha_dense)}

    def forward(self, y, media, text_to_media, attention_mask=None):
        if self.kind == "self":
            a = self.attn(self.norm(y), attention_mask)  # (B, L, D)
        elif media is None:
            a = None  # no images: a cross-attention layer adds nothing (as before the first image)
        else:
            a = self.attn(self.norm(y), media, text_to_media)  # (B, L, D)
        g_attn, g_ffw = (1.0, 1.0) if self.gating == "none" else (torch.tanh(self.alpha_xattn),
                                                                   torch.tanh(self.alpha_dense))
        if a is not None:
            y = y + g_attn * a
        return y + g_ffw * self.ffw(y)


@XATTN.register("grafting")
def build_graft_stack(cfg: XAttnConfig, dim: int, dim_media: int, n_layers: int) -> nn.ModuleList:
    """``n_layers`` GraftLayers alternating self-attention (even) and cross-attention (odd)."""
    if n_layers < 2:
        raise ValueError(f"xattn=grafting needs at least 2 layers (one self-, one cross-attention); got "
                         f"graft_layers={n_layers}: set model.xattn.graft_layers >= 2")
    return nn.ModuleList(GraftLayer(cfg, dim, dim_media, "self" if j % 2 == 0 else "cross") for j in range(n_layers))


def run_graft_stack(layers: nn.ModuleList, y, media, text_to_media, attention_mask=None) -> torch.Tensor:
    for layer in layers:
        y = layer(y, media, text_to_media, attention_mask)
    return y


def build_xattn(cfg: XAttnConfig, dim: int, dim_media: int) -> nn.Module:
    """One block inserted before an LM layer (gated, vanilla); grafting uses :func:`build_graft_stack`."""
    if cfg.name == "grafting":
        raise ValueError("xattn=grafting inserts no block in the LM; build it with build_graft_stack")
    return XATTN.get(cfg.name)(cfg, dim, dim_media)
