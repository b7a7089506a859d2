"""Cross-attention from text to images, with the paper's image-causal masking.

Every block maps text ``y: (B, L, D_lm)``, media ``(B, T_img, n, D_v)`` and
``text_to_media: (B, L)`` (1-based index of each token's latest ``<image>``, 0 = none yet)
to a new ``y: (B, L, D_lm)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import XATTN, XAttnConfig
from .resampler import feed_forward


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
            self.alpha_xattn = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the LM starts unchanged
            self.alpha_dense = nn.Parameter(torch.zeros(()))

    def gates(self) -> dict[str, float]:
        """The current gate values tanh(alpha) (1.0 for gating='none')."""
        if self.gating == "none":
            return {"attn": 1.0, "ffw": 1.0}
        return {"attn": torch.tanh(self.alpha_xattn).item(), "ffw": torch.tanh(self.alpha_dense).item()}

    def forward(self, y: torch.Tensor, media: torch.Tensor, text_to_media: torch.Tensor) -> torch.Tensor:
        if self.gating == "none":
            y = y + self.xattn(self.norm(y), media, text_to_media)
            return y + self.ffw(y)
        y = y + torch.tanh(self.alpha_xattn) * self.xattn(self.norm(y), media, text_to_media)
        return y + torch.tanh(self.alpha_dense) * self.ffw(y)


def build_xattn(cfg: XAttnConfig, dim: int, dim_media: int) -> nn.Module:
    return XATTN.get(cfg.name)(cfg, dim, dim_media)
