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

# Vision encoders: short name -> {size: (timm model name, timm kwargs)}. ``size`` is VisionConfig.size:
# "full" is the real architecture (paper scales), "small" a small member of the same family built
# from a timm config (tiny/embedded scales), ordered in strength as the paper's are: F6 > CLIP > F0
# (small: ~276k, ~114k, ~33k parameters). ``{image_size}`` in a value is replaced by
# VisionConfig.image_size. Any other name is taken as a timm model name (used as it is).
# Small NFNets run at output_stride 8 so a 32 px image still gives a 4x4 grid of tokens.
_SMALL_VIT = dict(img_size="{image_size}", patch_size=8, embed_dim=64, depth=2, num_heads=2)
_SMALL_NFNET = dict(output_stride=8, stem_chs=16)
VISION_ENCODERS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    # A 2-layer, 64-wide ViT on 32 px images (16 tokens of 8x8 px): CPU tests and the tiny scale.
    "tiny": {"small": ("vit_tiny_patch16_224", _SMALL_VIT), "full": ("vit_tiny_patch16_224", _SMALL_VIT)},
    # paper: NFNet-F6, 435M, 3072-d features (timm dm_nfnet_f6 without its classifier: 435.3M)
    "nfnet_f6": {
        "small": ("dm_nfnet_f0", dict(_SMALL_NFNET, depths=(1, 2, 4, 2), channels=(32, 64, 96, 96),
                                      group_size=16, num_features=192)),
        "full": ("dm_nfnet_f6", {}),
    },
    # Table 3 (vii): NFNet-F0, 68.4M without its classifier, 3072-d features
    "nfnet_f0": {
        "small": ("dm_nfnet_f0", dict(_SMALL_NFNET, depths=(1, 1, 1, 1), channels=(16, 32, 48, 48),
                                      group_size=8, num_features=96)),
        "full": ("dm_nfnet_f0", {}),
    },
    # Table 3 (vii): CLIP ViT-L/14 (at 224 px in CLIP; here at vision.image_size), 303M, 1024-d tokens
    "clip_vit_l14": {
        "small": ("vit_large_patch14_clip_224", _SMALL_VIT),
        "full": ("vit_large_patch14_clip_224", dict(img_size="{image_size}")),
    },
}
VISION_SIZES = ["small", "full"]


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
    size: str = "full"  # 'full': the real architecture; 'small': a small member of its family (scale=tiny)
    image_size: int = 32  # paper: 320 px (288 in contrastive pretraining); tiny: 32 px
    timm_kwargs: dict = field(default_factory=dict)  # merged over the registry's kwargs
    checkpoint: str | None = None  # local weights file (.pt/.pth/.bin/.safetensors); never downloaded
    # In-process cache of the frozen encoder's tokens by frame content, in MiB (0: off); models/vision.py
    cache_mib: int = 0

    def __post_init__(self):
        _check_positive_int("vision.image_size", self.image_size)
        if isinstance(self.cache_mib, bool) or not isinstance(self.cache_mib, int) or self.cache_mib < 0:
            raise ValueError(f"vision.cache_mib must be a whole number of MiB >= 0 (0 turns the feature cache "
                             f"off); got {self.cache_mib!r}")
        _check_choice("vision.size", self.size, VISION_SIZES)
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
    """The resampler: ``(B, T_img, F, N, D_v)`` visual tokens -> ``(B, T_img, n_latents, dim)``.

    Matched parameter budget (Table 3 (vi) compares the kinds at the same size): ``depth`` is the
    budget, counted in Perceiver Resampler layers (paper: 6). The perceiver has exactly ``depth``
    layers; ``mlp`` and ``transformer`` get the number of their own layers (``layers``) whose parameter
    count comes closest to that perceiver's at the same width, unless ``layers`` is set. So every
    scale (tiny: depth 1; embedded: depth 1; paper: depth 6) matches the kinds by setting ``depth`` alone:
    e.g. at 3B the perceiver (6 layers) has 198M, the transformer 7 layers (203M), the MLP 10 (193M).
    """

    name: str = "perceiver"  # paper: Perceiver Resampler (Table 3 (vi) ablates mlp / transformer)
    dim: int | None = 1536  # paper: 1536 wide (NFNet-F6's 3072-d features are projected to it); None: D_v
    depth: int = 6  # paper: 6 layers; the parameter budget of every kind, in perceiver layers
    layers: int | None = None  # mlp/transformer: own layer count; None = matched to `depth` perceiver layers
    n_latents: int = 64  # paper: 64 visual tokens per image
    heads: int = 16  # paper: 16 heads
    dim_head: int = 96  # paper: 1536 wide / 16 heads
    ff_mult: int = 4  # paper: feed-forward 4x the width
    max_frames: int = 8  # paper: 8 frames at 1 fps in training (learned time embeddings)
    # A learned embedding per position of the encoder's token grid, added like the time embedding. Paper: none
    # (appendix: no explicit spatial grid position encodings, "we did not observe improvements"; CNNs carry
    # position channel-wise). Off at every scale; at the embedded scale it did not help either (README).
    spatial_emb: bool = False

    def __post_init__(self):
        _check_choice("resampler.name", self.name, list_resamplers())
        if not isinstance(self.spatial_emb, bool):
            raise ValueError(f"resampler.spatial_emb must be true or false; got {self.spatial_emb!r}")
        for k in ("depth", "n_latents", "heads", "dim_head", "ff_mult", "max_frames"):
            _check_positive_int(f"resampler.{k}", getattr(self, k))
        for k in ("dim", "layers"):
            if getattr(self, k) is not None:
                _check_positive_int(f"resampler.{k}", getattr(self, k))
        if self.name == "perceiver" and self.layers not in (None, self.depth):
            raise ValueError(f"resampler.layers={self.layers} is for mlp/transformer; the perceiver has "
                             f"`depth` layers: set resampler.depth={self.layers} instead (or layers=null)")


XATTN_GATING = ["tanh", "none"]
XATTN_ATTEND = ["immediate", "all_previous"]


@dataclass
class XAttnConfig:
    """How text reads the visual tokens.

    ``every`` (gated, vanilla): a block before LM layer i for i in ``xattn_layer_indices``: an integer n
    gives layers 0, n, 2n, ... (every n-th layer starting at the first, as the paper's 9B/80B); 'middle'
    gives the single layer n_layers // 2; a list gives exactly those layers (0-based).
    ``grafting`` inserts nothing in the LM: ``graft_layers`` new layers (alternating self-attention and
    cross-attention, each with a feed-forward) run on the LM's final hidden states before its output
    head; None = as many layers as ``every`` would insert blocks (at least 2), so the budgets match.
    """

    name: str = "gated"  # paper: GATED XATTN-DENSE (Table 3 (iv) ablates vanilla / grafting)
    gating: str = "tanh"  # paper: tanh gates initialised at 0; 'none' is Table 3 (iii)
    every: Any = 1  # paper 3B: every layer; 9B: every 4th; 80B: every 7th; 'middle' = single block
    attend: str = "immediate"  # paper: a token sees only the latest image; 'all_previous' = Table 10
    heads: int = 8  # OpenFlamingo's; the paper uses 128-wide heads (width / 128 heads), see presets
    dim_head: int = 64
    ff_mult: int = 4  # paper: feed-forward 4x the width, Squared ReLU
    graft_layers: int | None = None  # grafting only: layers of the new stack (None: matched to `every`)

    def __post_init__(self):
        _check_choice("xattn.name", self.name, list_xattn())
        _check_choice("xattn.gating", self.gating, XATTN_GATING)
        _check_choice("xattn.attend", self.attend, XATTN_ATTEND)
        for k in ("heads", "dim_head", "ff_mult"):
            _check_positive_int(f"xattn.{k}", getattr(self, k))
        check_every(self.every)
        if self.name == "vanilla" and self.gating != "none":
            raise ValueError("xattn 'vanilla' is the plain cross-attention of the Transformer decoder and has no "
                             f"gate: set model.xattn.gating=none, or choose gating={XATTN_GATING} with "
                             "xattn=gated or xattn=grafting")
        if self.graft_layers is not None:
            _check_positive_int("xattn.graft_layers", self.graft_layers)
            if self.name != "grafting":
                raise ValueError(f"xattn.graft_layers is for xattn=grafting only; got it with xattn={self.name} "
                                 "(set it to null)")


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


# Table 3 (viii). All three train on the same loss mask: every text token (labels come from the data
# side with -100 on padding and on <image>, whose embedding is no target) -- the paper's loss covers all
# text tokens whatever is trained. 'frozen': only the new parts train; 'train_pretrained': the LM's
# weights train too; 'train_from_scratch': the LM is re-initialised (its own init) and trained.
LM_FREEZE = ["frozen", "train_pretrained", "train_from_scratch"]


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
    )  # `model_type` + Hugging Face config kwargs; vocab_size comes from the tokenizer unless given
    # local tokenizer folder; defaults to `path`. None with arch.vocab_size: a stand-in vocabulary
    # (the special tokens take the last two ids) for counting parameters and meta-device builds.
    tokenizer: str | None = None
    freeze: str = "frozen"  # paper: frozen LM; see LM_FREEZE
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
    # build_flamingo builds on this device when set. Paper-scale presets set 'meta' (shapes only, no
    # memory: parameter counts); give model.init_device=null (or cuda) to build real weights.
    init_device: str | None = None

    def __post_init__(self):
        for f in fields(self):
            if f.name not in _PARTS:
                continue
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
        unknown = set(d) - set(_PARTS) - _IGNORED_KEYS - {"init_device"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys are "
                             f"{sorted([*_PARTS, 'init_device'])}")
        parts = {k: _part_from_dict(k, _PARTS[k], d[k] or {}) for k in _PARTS if k in d}
        return cls(**parts, init_device=d.get("init_device"))

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
