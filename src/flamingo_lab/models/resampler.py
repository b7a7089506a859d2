"""Resamplers: a variable number of visual tokens -> a fixed number of visual tokens per image.

Every resampler maps ``(B, T_img, F, N, D_v)`` to ``(B, T_img, n_latents, dim)``: it adds a learned
time embedding per frame (and, with ``resampler.spatial_emb``, a learned embedding per token position on
the encoder's grid), flattens the frames into its keys and projects the vision width ``D_v`` to its own
width ``dim`` (paper: NFNet-F6's 3072 -> 1536). The kinds (Table 3 (vi)) have the same
parameter budget: ``resampler.depth`` perceiver layers; see :class:`ResamplerConfig`.
"""

from __future__ import annotations

import dataclasses

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
    """Latents attend to [visual tokens; latents] (paper Figure 5).

    Each layer reads the frozen ``D_v``-wide features through its own norm and projection to the
    resampler width: with the paper's shapes (6 layers, 1536 wide, F6's 3072-d features) that gives
    198M parameters against the paper's 194M (one shared projection would give 175M, -10%).
    """

    def __init__(self, dim: int, dim_media: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim_media)
        self.proj_media = nn.Linear(dim_media, dim, bias=False)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (B, T, M, D_v) visual tokens of all frames; latents: (B, T, n, D)
        x, latents = self.proj_media(self.norm_media(x)), self.norm_latents(latents)  # (B, T, M, D)
        q = self.to_q(latents)  # (B, T, n, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=2)).chunk(2, dim=-1)  # (B, T, M+n, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(2, 3) for t in (q, k, v))  # (B, T, h, *, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, T, h, n, d)
        return self.to_out(out.transpose(2, 3).flatten(-2))  # (B, T, n, D)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over a set of tokens (no mask)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)  # (..., M, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-3, -2) for t in (q, k, v))  # (..., h, M, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (..., h, M, d)
        return self.to_out(out.transpose(-3, -2).flatten(-2))  # (..., M, D)


class Resampler(nn.Module):
    """What every kind shares: width, time embeddings, the frames flattened into the keys."""

    def __init__(self, cfg: ResamplerConfig, dim_media: int, n_layers: int, n_tokens: int | None = None):
        super().__init__()
        self.cfg, self.n_layers = cfg, n_layers
        self.dim = cfg.dim if cfg.dim is not None else dim_media
        self.time_emb = nn.Parameter(torch.zeros(cfg.max_frames, 1, dim_media))  # (max_frames, 1, D_v)
        nn.init.normal_(self.time_emb, std=0.02)
        self.spatial_emb = None
        if cfg.spatial_emb:
            if n_tokens is None:
                raise ValueError("resampler.spatial_emb needs the vision encoder's number of tokens per frame")
            self.spatial_emb = nn.Parameter(torch.zeros(n_tokens, dim_media))  # (N, D_v)
            nn.init.normal_(self.spatial_emb, std=0.02)
        self.norm = nn.LayerNorm(self.dim)

    def frames_to_keys(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, F, N, D_v)`` + time embedding -> ``(B, T, F*N, D_v)``."""
        if x.ndim != 5:
            raise ValueError(f"resampler input must be (B, T_img, F, N, D); got shape {tuple(x.shape)}")
        n_frames = x.shape[2]
        if n_frames > self.cfg.max_frames:
            raise ValueError(f"got {n_frames} frames per image but resampler.max_frames is "
                             f"{self.cfg.max_frames}; raise resampler.max_frames or sample fewer frames")
        x = x + self.time_emb[:n_frames]  # (B, T, F, N, D_v)
        if self.spatial_emb is not None:
            if x.shape[3] != self.spatial_emb.shape[0]:
                raise ValueError(f"resampler.spatial_emb has {self.spatial_emb.shape[0]} token positions but the "
                                 f"vision encoder gave {x.shape[3]} tokens per frame")
            x = x + self.spatial_emb  # (B, T, F, N, D_v)
        return x.flatten(2, 3)  # (B, T, F*N, D_v)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, M, D)`` -> ``(B, T, n_latents, D)``: average over M / n_latents consecutive tokens."""
        M, n = x.shape[2], self.cfg.n_latents
        if M < n:
            raise ValueError(f"the {self.cfg.name} resampler pools {M} visual tokens per image down to "
                             f"n_latents={n}; choose resampler.n_latents <= {M} or resampler=perceiver")
        B, T = x.shape[:2]
        x = F.adaptive_avg_pool1d(x.flatten(0, 1).transpose(1, 2), n)  # (B*T, D, n)
        return x.transpose(1, 2).unflatten(0, (B, T))  # (B, T, n, D)


@RESAMPLERS.register("perceiver")
class PerceiverResampler(Resampler):
    """The paper's: ``n_latents`` learned queries cross-attend to [frames' tokens; latents], ``depth`` times."""

    def __init__(self, cfg: ResamplerConfig, dim_media: int, n_layers: int | None = None, n_tokens: int | None = None):
        super().__init__(cfg, dim_media, cfg.depth if n_layers is None else n_layers, n_tokens)
        dim = self.dim
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, dim))  # (n_latents, D)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_media, cfg.heads, cfg.dim_head), feed_forward(dim, cfg.ff_mult)])
            for _ in range(self.n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frames_to_keys(x)  # (B, T, F*N, D_v)
        latents = self.latents.expand(*x.shape[:2], -1, -1)  # (B, T, n_latents, D)
        for attn, ffw in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ffw(latents)
        return self.norm(latents)  # (B, T, n_latents, D)


@RESAMPLERS.register("mlp")
class MLPResampler(Resampler):
    """Table 3 (vi) 'MLP': project, residual feed-forward layers per visual token, pool to n_latents."""

    def __init__(self, cfg: ResamplerConfig, dim_media: int, n_layers: int, n_tokens: int | None = None):
        super().__init__(cfg, dim_media, n_layers, n_tokens)
        self.proj = nn.Sequential(nn.LayerNorm(dim_media), nn.Linear(dim_media, self.dim, bias=False))
        self.layers = nn.ModuleList(feed_forward(self.dim, cfg.ff_mult) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.frames_to_keys(x))  # (B, T, F*N, D)
        for ffw in self.layers:
            x = x + ffw(x)
        return self.norm(self.pool(x))  # (B, T, n_latents, D)


@RESAMPLERS.register("transformer")
class TransformerResampler(Resampler):
    """Table 3 (vi) 'Transformer': a vanilla Transformer over all visual tokens, pooled to n_latents."""

    def __init__(self, cfg: ResamplerConfig, dim_media: int, n_layers: int, n_tokens: int | None = None):
        super().__init__(cfg, dim_media, n_layers, n_tokens)
        dim = self.dim
        self.proj = nn.Sequential(nn.LayerNorm(dim_media), nn.Linear(dim_media, dim, bias=False))
        self.layers = nn.ModuleList(
            nn.ModuleList([SelfAttention(dim, cfg.heads, cfg.dim_head), feed_forward(dim, cfg.ff_mult)])
            for _ in range(n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.frames_to_keys(x))  # (B, T, F*N, D)
        for attn, ffw in self.layers:
            x = x + attn(x)
            x = x + ffw(x)
        return self.norm(self.pool(x))  # (B, T, n_latents, D)


def _count(cls, cfg: ResamplerConfig, dim_media: int, n_layers: int) -> int:
    cfg = dataclasses.replace(cfg, spatial_emb=False)  # the same table in every kind: not part of the budget
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg, dim_media, n_layers).parameters())


def resampler_layers(cfg: ResamplerConfig, dim_media: int) -> int:
    """Layers of ``cfg.name``: the perceiver's ``depth``; else ``layers`` or the matched-budget count."""
    if cfg.name == "perceiver":
        return cfg.depth
    if cfg.layers is not None:
        return cfg.layers
    cls = RESAMPLERS.get(cfg.name)
    budget = _count(PerceiverResampler, cfg, dim_media, cfg.depth)
    base = _count(cls, cfg, dim_media, 0)
    per_layer = _count(cls, cfg, dim_media, 1) - base
    return max(1, round((budget - base) / per_layer))


def build_resampler(cfg: ResamplerConfig, dim_media: int, n_tokens: int | None = None) -> Resampler:
    """``n_tokens``: the vision encoder's tokens per frame (needed by ``cfg.spatial_emb``)."""
    return RESAMPLERS.get(cfg.name)(cfg, dim_media, resampler_layers(cfg, dim_media), n_tokens)
