"""Compose the training config exactly as the command line does (same conf/, same groups, same defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

def _first_set(*values):
    """``${first_set:a,b,...}``: the first value that is set (not null), e.g. a tokenizer folder."""
    return next((v for v in values if v not in (None, "None", "null", "")), None)


def _if_row(row, then, otherwise, *, _root_):
    """``${if_row:baseline,a,b}``: ``a`` in a run of that experiment row (``experiment``), else ``b``."""
    value = then if str(_root_.get("experiment")) == str(row) else otherwise
    # a list or dict as a config node: OmegaConf.resolve (hydra --cfg job --resolve) refuses plain ones
    return OmegaConf.create(value) if isinstance(value, (list, dict)) else value


if not OmegaConf.has_resolver("first_set"):
    OmegaConf.register_new_resolver("first_set", _first_set)
if not OmegaConf.has_resolver("if_row"):
    OmegaConf.register_new_resolver("if_row", _if_row)

#: The repository's conf/ folder (the package is installed editable from src/).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Config groups that are ablation axes: ``results.json`` and W&B tags record their choices.
ABLATION_KEYS = {
    "vision": "model.vision.name",
    "resampler": "model.resampler.name",
    "xattn": "model.xattn.name",
    "gating": "model.xattn.gating",
    "xattn_every": "model.xattn.every",
    "attend": "model.xattn.attend",
    "lm": "model.lm.arch.model_type",
    "lm_freeze": "model.lm.freeze",
}


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Return the composed config for ``config_name`` with Hydra ``overrides`` (as on the command line)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(
            f"conf/ not found at {CONF_DIR}: flamingo_lab must be installed editable from the repository "
            "(`pip install -e .`, as `make` does)."
        )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def ablation_choices(cfg: DictConfig) -> dict[str, str]:
    """The ablation choices of a run, read from the config itself (works under compose() and the CLI)."""
    choices = {}
    for key, path in ABLATION_KEYS.items():
        value = OmegaConf.select(cfg, path, default=None)
        if OmegaConf.is_list(value):
            value = ",".join(map(str, value))
        if value is not None:
            choices[key] = str(value)
    return choices
