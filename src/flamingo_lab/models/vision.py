"""The frozen vision encoder: any timm model, images -> a grid of feature tokens per frame."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .config import VISION_ENCODERS, VisionConfig


def create_timm_model(cfg: VisionConfig) -> nn.Module:
    """The timm model of ``cfg`` without its classifier head, never pretrained from the hub.

    A registered name gives its ``cfg.size`` member ('full': the real architecture, 'small': a small
    model of the same family); weights only ever come from ``cfg.checkpoint``.
    """
    if cfg.name in VISION_ENCODERS:
        timm_name, defaults = VISION_ENCODERS[cfg.name][cfg.size]
        kwargs = {k: (cfg.image_size if v == "{image_size}" else v) for k, v in defaults.items()}
    else:
        timm_name, kwargs = cfg.name, {}
    kwargs = {**kwargs, **cfg.timm_kwargs, "pretrained": False, "num_classes": 0}
    model = timm.create_model(timm_name, **kwargs)
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model``, failing loudly on any key or shape mismatch."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vision.checkpoint '{path}' is not a file; give a local weights file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # The classifier was removed (num_classes=0): its weights in the checkpoint are expected extras.
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if head:
        sd = {k: v for k, v in sd.items() if not k.startswith(f"{head}.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"vision.checkpoint '{path}' does not fit the model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {shapes[:10]} "
            "(check vision.name, vision.image_size and vision.timm_kwargs)"
        )
    model.load_state_dict(sd)


class VisionEncoder(nn.Module):
    """Frozen timm backbone. ``(B, T_img, F, C, H, W)`` -> ``(B, T_img, F, N, D_v)``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.model = create_timm_model(cfg)
        self.model.requires_grad_(False)
        self.model.eval()
        self.in_chans = cfg.timm_kwargs.get("in_chans", 3)
        # One dry run gives N and D_v for any backbone (ViT tokens or conv grids).
        p = next(self.model.parameters())
        probe = torch.zeros(1, self.in_chans, cfg.image_size, cfg.image_size, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            tokens = self._tokens(probe)  # (1, N, D_v)
        self.num_tokens, self.dim = tokens.shape[1], tokens.shape[2]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval (no dropout, fixed norm statistics)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # conv grid (B, C, h, w)
            return feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if feats.ndim == 3:  # tokens (B, prefix + N, D)
            return feats[:, getattr(self.model, "num_prefix_tokens", 0):]  # (B, N, D)
        raise ValueError(f"vision encoder '{self.cfg.name}' gave features of shape {tuple(feats.shape)}; "
                         "expected (B, C, h, w) or (B, N, D)")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 6:
            raise ValueError(f"images must be (B, T_img, F, C, H, W); got shape {tuple(images.shape)}")
        B, T, F = images.shape[:3]
        x = images.flatten(0, 2)  # (B*T_img*F, C, H, W)
        x = self._tokens(x)  # (B*T_img*F, N, D_v)
        return x.reshape(B, T, F, *x.shape[1:])  # (B, T_img, F, N, D_v)
