"""Resamplers: a variable number of visual tokens -> a fixed number of visual tokens per image.

Every resampler maps ``(B, T_img, F, N, D)`` to ``(B, T_img, n_latents, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RESAMPLERS, ResamplerConfig


class SquaredReLU(nn.Module):
    """relu(x)^2, the paper's activation for every new layer (So et al., Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm MLP with Squared ReLU, ``mult * dim`` wide."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, mult * dim, bias=False),
        SquaredReLU(),
        nn.Linear(mult * dim, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [visual tokens; latents] (paper Figure 5)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (B, T, M, D) visual tokens of all frames; latents: (B, T, n, D)
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)  # (B, T, n, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=2)).chunk(2, dim=-1)  # (B, T, M+n, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(2, 3) for t in (q, k, v))  # (B, T, h, *, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, T, h, n, d)
        return self.to_out(out.transpose(2, 3).flatten(-2))  # (B, T, n, D)


@RESAMPLERS.register("perceiver")
class PerceiverResampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, dim))  # (n_latents, D)
        self.time_emb = nn.Parameter(torch.zeros(cfg.max_frames, 1, dim))  # (max_frames, 1, D)
        nn.init.normal_(self.time_emb, std=0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.heads, cfg.dim_head), feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"resampler input must be (B, T_img, F, N, D); got shape {tuple(x.shape)}")
        B, T, n_frames = x.shape[:3]
        if n_frames > self.cfg.max_frames:
            raise ValueError(f"got {n_frames} frames per image but resampler.max_frames is "
                             f"{self.cfg.max_frames}; raise resampler.max_frames or sample fewer frames")
        x = x + self.time_emb[:n_frames]  # (B, T, F, N, D)
        x = x.flatten(2, 3)  # (B, T, F*N, D)
        latents = self.latents.expand(B, T, -1, -1)  # (B, T, n_latents, D)
        for attn, ffw in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ffw(latents)
        return self.norm(latents)  # (B, T, n_latents, D)


def build_resampler(cfg: ResamplerConfig, dim: int) -> nn.Module:
    return RESAMPLERS.get(cfg.name)(cfg, dim)
