"""The frozen vision encoder: any timm model, images -> a grid of feature tokens per frame."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from .config import VISION_ENCODERS, VisionConfig

log = logging.getLogger(__name__)


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
    """Load local timm or open_clip visual weights into ``model``, failing loudly on any mismatch.

    Accepted layouts (a ``state_dict`` / ``model`` / ``module`` wrapper and DDP's ``module.`` prefix
    are unwrapped first):

    - a timm state dict of the same architecture (its classifier, removed here, is ignored);
    - an open_clip checkpoint with a ViT visual tower (``visual.conv1.weight``, ``visual.class_embedding``,
      ``visual.transformer.resblocks.N...``; the OpenAI CLIP layout), mapped onto a timm ViT built with
      CLIP's pre-norm (e.g. vision.name=clip_vit_l14) by timm's own converter;
    - an open_clip checkpoint with a timm trunk (``visual.trunk.*``).

    In open_clip checkpoints only the visual tower is read: the text tower, ``logit_scale`` and the
    projection into the joint space (``visual.proj``, ``visual.head.*``) are ignored. A ViT's position
    embedding is resampled to the model's grid when the checkpoint was trained at another image size
    (as timm does); any other missing or unexpected key or shape mismatch is an error that lists them.
    """
    sd = read_state_dict(path)
    sd, layout = to_timm_state_dict(sd, model)
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
            f"vision.checkpoint '{path}' (read as {layout}) does not fit the model "
            f"({type(model).__name__}): {len(missing)} missing keys {missing[:10]}, {len(unexpected)} "
            f"unexpected keys {unexpected[:10]}, {len(shapes)} shape mismatches {shapes[:10]} "
            "(check vision.name, vision.size, vision.image_size and vision.timm_kwargs; open_clip ViT "
            "towers need a CLIP-style timm ViT such as vision.name=clip_vit_l14)"
        )
    model.load_state_dict(sd)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from a .safetensors or torch file, wrappers and ``module.`` removed."""
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
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"vision.checkpoint '{path}' holds no state dict of tensors (a dict, or one "
                         "under 'state_dict' / 'model' / 'module')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def to_timm_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """``sd`` in ``model``'s own (timm) key layout, and the name of the layout it was read as."""
    from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip

    layout = "a timm state dict"
    if any(k.startswith("visual.trunk.") for k in sd):
        sd = {k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")}
        layout = "an open_clip checkpoint with a timm trunk (visual.trunk.*)"
    elif "visual.class_embedding" in sd or "visual.conv1.weight" in sd:
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"an open_clip ViT visual tower loads only into a timm ViT; vision.name gives "
                             f"{type(model).__name__} (choose vision.name=clip_vit_l14 or a vit_*_clip_* model)")
        sd = _convert_openai_clip(sd, model, prefix="visual.")  # text tower dropped, visual.proj -> head.*
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the joint-space projection
        layout = "an open_clip ViT checkpoint (visual.*)"
    elif any(k.startswith("visual.") for k in sd):
        raise ValueError("this open_clip checkpoint's visual tower is neither a ViT (visual.conv1, "
                         "visual.transformer...) nor a timm trunk (visual.trunk.*); e.g. "
                         f"{sorted(k for k in sd if k.startswith('visual.'))[:5]}: convert it to a timm "
                         "state dict first")
    if isinstance(model, VisionTransformer):
        sd = _resample_pos_embed(sd, model)
    return sd, layout


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ViT trained at another image size: its position embedding, resampled to ``model``'s grid.

    Only a square grid of the same width is resampled (as timm and open_clip do); anything else is
    left to the shape check.
    """
    from timm.layers import resample_abs_pos_embed

    old, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if old is None or own is None or old.ndim != 3 or old.shape == own.shape or old.shape[-1] != own.shape[-1]:
        return sd
    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    side = math.isqrt(old.shape[1] - n_prefix)
    if side * side != old.shape[1] - n_prefix:
        return sd
    log.info("vision.checkpoint: position embedding resampled from a %dx%d grid to %s", side, side,
             tuple(model.patch_embed.grid_size))
    new = resample_abs_pos_embed(old, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                 num_prefix_tokens=n_prefix)  # (1, n_prefix + h*w, D)
    return {**sd, "pos_embed": new}


class FeatureCache:
    """The frozen encoder's tokens for each frame it has seen, found by the frame's content.

    A frame's key is a BLAKE2b digest of its pixel bytes, shape and dtype, and of the autocast state it is
    encoded under, so a hit is the same image whatever sample, slot, step or prompt it comes from, and any
    change to a frame (or to the precision it is encoded at) is a miss, never a stale answer. Frames that repeat within one call (the zero frames of empty image slots, a support image
    shown in several prompts) are encoded once. Beyond ``max_bytes`` the least recently used entries go.
    Entries live on the device the encoder computed them on. The encoder must be frozen and deterministic,
    which :class:`VisionEncoder` always is (no gradient, always in eval mode).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.repeats = self.misses = self.evictions = 0

    @staticmethod
    def keys(frames: torch.Tensor, context: str = "") -> list[bytes]:
        """One digest per frame of ``(M, C, H, W)``: its bytes, with its shape, dtype and ``context``."""
        x = frames.detach().to("cpu").contiguous()
        head = f"{tuple(x.shape[1:])}|{x.dtype}{'|' + context if context else ''}".encode()
        rows = x.reshape(len(x), -1).view(torch.uint8).numpy()  # (M, bytes per frame)
        keys = []
        for row in rows:
            h = hashlib.blake2b(head, digest_size=16)
            h.update(row)  # the row's buffer, not a copy
            keys.append(h.digest())
        return keys

    @staticmethod
    def context(device: torch.device) -> str:
        """What besides the frame decides the encoder's output: autocast on ``device`` (bf16-mixed training
        computes the features at bf16 precision; an evaluation after it without autocast must not get them)."""
        kind = torch.device(device).type
        if torch.is_autocast_enabled(kind):
            return f"autocast={torch.get_autocast_dtype(kind)}"
        return ""

    def encode(self, frames: torch.Tensor, encoder) -> torch.Tensor:
        """``encoder(frames)`` ``(M, N, D)``, computed only for the frames not in the cache (once each)."""
        keys = self.keys(frames, self.context(frames.device))
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, int] = {}  # key -> index of its first frame in this call
        for i, key in enumerate(keys):
            if key in found or key in todo:
                self.repeats += 1
            elif key in self._store:
                found[key] = self._store[key]
                self._store.move_to_end(key)
                self.hits += 1
            else:
                todo[key] = i
        if todo:
            new = encoder(frames[list(todo.values())])  # (misses, N, D)
            self.misses += len(todo)
            for key, tokens in zip(todo, new):
                found[key] = tokens.clone()  # its own storage, not a view of the batch
                self._put(key, found[key])
        return torch.stack([found[key] for key in keys])  # (M, N, D)

    def _put(self, key: bytes, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = tokens
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1

    def stats(self) -> dict:
        """Frames served from the cache (``hits``), repeated within a call (``repeats``), encoded
        (``misses``); entries dropped; what it holds."""
        seen = self.hits + self.repeats + self.misses
        return {"frames": seen, "hits": self.hits, "repeats": self.repeats, "misses": self.misses,
                "saved_share": round((self.hits + self.repeats) / seen, 4) if seen else None,
                "evictions": self.evictions, "entries": len(self._store), "mib": round(self.bytes / 2**20, 2),
                "max_mib": round(self.max_bytes / 2**20, 2)}


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
        self.cache = FeatureCache(cfg.cache_mib * 2**20) if cfg.cache_mib else None

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
        x = self._tokens(x) if self.cache is None else self.cache.encode(x, self._tokens)  # (B*T_img*F, N, D_v)
        return x.reshape(B, T, F, *x.shape[1:])  # (B, T_img, F, N, D_v)
