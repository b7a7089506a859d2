"""Typed configs, one per Flamingo part, and the registries of short names.

Defaults are the paper's values (Alayrac et al. 2022, Appendix B.1) unless a comment says otherwise.
Every ``__post_init__`` rejects bad values with a message that says how to fix them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable


class Registry:
    """Short name -> builder, one per ablation axis (open_clip's ``list_models`` style)."""

    def __init__(self, axis: str):
        self.axis = axis
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(fn):
            if name in self._items:
                raise ValueError(f"{self.axis} '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise ValueError(f"unknown {self.axis} '{name}'; choose one of {self.names()}")
        return self._items[name]


# Filled by @RESAMPLERS.register(...) in resampler.py and @XATTN.register(...) in xattn.py.
RESAMPLERS = Registry("resampler")
XATTN = Registry("xattn")

# Vision encoders: short name -> (timm model name, default timm kwargs). ``{image_size}`` in a
# value is replaced by VisionConfig.image_size. Any other string is taken as a timm model name.
VISION_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    # A 2-layer, 64-wide ViT on 32 px images (16 tokens of 8x8 px): CPU tests and the tiny scale.
    "tiny": (
        "vit_tiny_patch16_224",
        dict(img_size="{image_size}", patch_size=8, embed_dim=64, depth=2, num_heads=2),
    ),
}


def list_vision_encoders() -> list[str]:
    return sorted(VISION_ENCODERS)


def list_resamplers() -> list[str]:
    return RESAMPLERS.names()


def list_xattn() -> list[str]:
    return XATTN.names()


def _check_choice(where: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}; got {value!r}")


def _check_positive_int(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an integer >= 1; got {value!r}")


@dataclass
class VisionConfig:
    name: str = "tiny"  # paper: NFNet-F6 (contrastively pretrained, frozen); 'tiny' runs on a CPU
    image_size: int = 32  # paper: 320 px (288 in contrastive pretraining); tiny: 32 px
    timm_kwargs: dict = field(default_factory=dict)  # merged over the registry's kwargs
    checkpoint: str | None = None  # local weights file (.pt/.pth/.bin/.safetensors); never downloaded

    def __post_init__(self):
        _check_positive_int("vision.image_size", self.image_size)
        if not isinstance(self.timm_kwargs, dict):
            raise ValueError(f"vision.timm_kwargs must be a dict of timm.create_model kwargs; got {self.timm_kwargs!r}")
        if self.name not in VISION_ENCODERS:
            import timm

            if not timm.is_model(self.name):
                raise ValueError(
                    f"unknown vision encoder '{self.name}'; choose one of {list_vision_encoders()} "
                    "or any timm model name (timm.list_models())"
                )


@dataclass
class ResamplerConfig:
    name: str = "perceiver"  # paper: Perceiver Resampler (Table 3 (vi) ablates mlp / transformer)
    depth: int = 6  # paper: 6 layers
    n_latents: int = 64  # paper: 64 visual tokens per image
    heads: int = 16  # paper: 16 heads
    dim_head: int = 96  # paper: 1536 wide / 16 heads
    ff_mult: int = 4  # paper: feed-forward 4x the width
    max_frames: int = 8  # paper: 8 frames at 1 fps in training (learned time embeddings)

    def __post_init__(self):
        _check_choice("resampler.name", self.name, list_resamplers())
        for k in ("depth", "n_latents", "heads", "dim_head", "ff_mult", "max_frames"):
            _check_positive_int(f"resampler.{k}", getattr(self, k))


@dataclass
class XAttnConfig:
    name: str = "gated"  # paper: GATED XATTN-DENSE (Table 3 (iv) ablates vanilla / grafting)
    gating: str = "tanh"  # paper: tanh gates initialised at 0; 'none' is Table 3 (iii)
    every: Any = 1  # paper 3B: every layer; 9B: every 4th; 80B: every 7th; 'middle' = single block
    attend: str = "immediate"  # paper: a token sees only the latest image; 'all_previous' = Table 10
    heads: int = 8  # OpenFlamingo's; the paper uses 128-wide heads (width / 128 heads), see presets
    dim_head: int = 64
    ff_mult: int = 4  # paper: feed-forward 4x the width, Squared ReLU

    def __post_init__(self):
        _check_choice("xattn.name", self.name, list_xattn())
        _check_choice("xattn.gating", self.gating, ["tanh", "none"])
        _check_choice("xattn.attend", self.attend, ["immediate", "all_previous"])
        for k in ("heads", "dim_head", "ff_mult"):
            _check_positive_int(f"xattn.{k}", getattr(self, k))
        check_every(self.every)


def check_every(every: Any) -> None:
    msg = "xattn.every must be >= 1, 'middle' or a list of layer indices; got {!r}"
    if isinstance(every, (list, tuple)):
        if not every or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in every):
            raise ValueError(msg.format(every) + " (a list must hold integers >= 0)")
        if len(set(every)) != len(every):
            raise ValueError(msg.format(every) + " (the list repeats a layer)")
    elif isinstance(every, str):
        if every != "middle":
            raise ValueError(msg.format(every))
    elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(msg.format(every))


LM_FREEZE = ["frozen", "train_pretrained"]  # 'train_from_scratch' (Table 3 (viii)) comes later


@dataclass
class LMConfig:
    # paper: Chinchilla 1.4B / 7B / 70B, frozen (not public). Default: a tiny Llama built from config.
    path: str | None = None  # local Hugging Face model folder; wins over `arch`
    arch: dict = field(
        default_factory=lambda: dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
    )  # `model_type` + Hugging Face config kwargs; vocab_size comes from the tokenizer
    tokenizer: str | None = None  # local tokenizer folder; defaults to `path`
    freeze: str = "frozen"  # paper: frozen LM; 'train_pretrained' is Table 3 (viii) fine-tuned
    name: str | None = None  # the config group's choice name, for logs only

    def __post_init__(self):
        _check_choice("lm.freeze", self.freeze, LM_FREEZE)
        if self.path is None:
            if not isinstance(self.arch, dict) or "model_type" not in self.arch:
                raise ValueError(
                    "lm.arch must be a dict with 'model_type' (e.g. 'llama', 'gpt2') plus Hugging Face "
                    f"config kwargs, or set lm.path to a local model folder; got {self.arch!r}"
                )

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer if self.tokenizer is not None else self.path


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    lm: LMConfig = field(default_factory=LMConfig)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):  # allow FlamingoConfig(vision={...}, ...)
                setattr(self, f.name, _part_from_dict(f.name, _PARTS[f.name], v))

    @classmethod
    def from_dict(cls, d: dict) -> "FlamingoConfig":
        """Build from a plain nested dict (e.g. ``OmegaConf.to_container(cfg.model)``).

        Top-level keys: vision, resampler, xattn, lm (each optional), plus the ignored
        bookkeeping keys ``name`` and ``_target_``.
        """
        if not isinstance(d, dict):
            raise TypeError(f"FlamingoConfig.from_dict expects a dict; got {type(d).__name__}")
        unknown = set(d) - set(_PARTS) - _IGNORED_KEYS
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys are {sorted(_PARTS)}")
        parts = {k: _part_from_dict(k, _PARTS[k], d[k] or {}) for k in _PARTS if k in d}
        return cls(**parts)

    def to_dict(self) -> dict:
        return asdict(self)


_PARTS = {"vision": VisionConfig, "resampler": ResamplerConfig, "xattn": XAttnConfig, "lm": LMConfig}
_IGNORED_KEYS = {"name", "_target_"}


def _part_from_dict(part: str, cls, d: Any):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise TypeError(f"model.{part} must be a dict; got {type(d).__name__}")
    valid = {f.name for f in fields(cls)}
    d = {k: v for k, v in d.items() if k != "_target_"}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in model.{part}; valid keys are {sorted(valid)}")
    return cls(**d)
