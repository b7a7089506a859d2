"""Flamingo models: torch, transformers and timm only (no hydra, lightning or wandb)."""

from __future__ import annotations

from typing import Any

import torch

from . import resampler as _resampler  # noqa: F401  (fills the resampler registry)
from . import xattn as _xattn  # noqa: F401  (fills the xattn registry)
from .config import (
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
    XAttnConfig,
    list_resamplers,
    list_vision_encoders,
    list_xattn,
)
from .flamingo import Flamingo
from .presets import PAPER_COUNTS, PRESETS, TABLE3_PARAMS
from .lm import load_tokenizer as _load_tokenizer
from .lm import xattn_layer_indices


def _to_config(cfg: Any) -> FlamingoConfig:
    if isinstance(cfg, FlamingoConfig):
        return cfg
    if not isinstance(cfg, dict):
        try:  # an OmegaConf DictConfig (the `model` node of a composed Hydra config)
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"expected a FlamingoConfig, a dict or a DictConfig; got {type(cfg).__name__}") from e
    if isinstance(cfg, dict):
        cfg = {k: (_plain(v) if k != "_target_" else v) for k, v in cfg.items()}
    return FlamingoConfig.from_dict(cfg)


def _plain(v: Any) -> Any:
    """DictConfig values passed as keyword arguments by hydra.utils.instantiate -> plain containers."""
    if isinstance(v, (dict, list, str, int, float, bool, type(None))):
        return v
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(v, resolve=True)
    except Exception:  # noqa: BLE001
        return v


def build_flamingo(cfg: Any = None, **parts: Any) -> Flamingo:
    """Build Flamingo from a FlamingoConfig, a plain dict or an OmegaConf DictConfig.

    ``cfg.init_device`` (e.g. ``meta``, set by the paper-scale presets) is the device it is built on.
    ``build_flamingo(vision=..., lm=...)`` also works, so the `model` node may carry
    ``_target_: flamingo_lab.models.build_flamingo``. Deterministic given ``torch.manual_seed``.
    """
    if cfg is None:
        cfg = parts
    elif parts:
        raise TypeError("give either a config or keyword parts, not both")
    config = _to_config(cfg)
    if config.init_device is None:
        return Flamingo(config)
    with torch.device(config.init_device):  # 'meta' (paper-scale presets): shapes only, no memory
        return Flamingo(config)


def load_tokenizer(lm_cfg: Any):
    """The LM's tokenizer with ``<image>`` and ``<|endofchunk|>`` ensured (what build_flamingo uses)."""
    if not isinstance(lm_cfg, LMConfig):
        lm_cfg = _to_config({"lm": _plain(lm_cfg)}).lm
    return _load_tokenizer(lm_cfg)


__all__ = [
    "Flamingo",
    "FlamingoConfig",
    "LMConfig",
    "ResamplerConfig",
    "VisionConfig",
    "XAttnConfig",
    "build_flamingo",
    "list_resamplers",
    "PAPER_COUNTS",
    "PRESETS",
    "TABLE3_PARAMS",
    "list_vision_encoders",
    "list_xattn",
    "load_tokenizer",
    "xattn_layer_indices",
]
