"""AdamW parameter groups per part of the Flamingo."""

from __future__ import annotations

from typing import Any

import torch

#: The parts, in the order their groups are returned.
#: "gates" are the cross-attention branches' tanh alphas, "dense_gates" the dense (FFW) branches'.
PARTS = ["resampler", "xattn", "gates", "dense_gates", "lm", "embeddings"]

#: Parameter-name prefix -> part (gates are found by ``model.gate_parameters()`` first).
_PREFIXES = {"resampler.": "resampler", "xattn_layers.": "xattn", "lm.": "lm", "special_embeddings.": "embeddings"}


def part_settings(optim: dict) -> dict[str, dict[str, float]]:
    """``{part: {"lr_mult", "weight_decay"}}`` from ``optim.groups`` (missing entries: lr x1, the global decay).

    Older configs without ``groups`` still work: ``resampler_weight_decay`` and ``gate_lr_mult``.
    """
    wd = float(optim["weight_decay"])
    default = {part: {"lr_mult": 1.0, "weight_decay": wd} for part in PARTS}
    default["resampler"]["weight_decay"] = float(optim.get("resampler_weight_decay", 0.0))  # paper: none
    default["gates"] = {"lr_mult": float(optim.get("gate_lr_mult", 1.0)), "weight_decay": 0.0}
    dense = optim.get("dense_gate_lr_mult")
    default["dense_gates"] = {"lr_mult": float(default["gates"]["lr_mult"] if dense is None else dense),
                              "weight_decay": 0.0}
    default["embeddings"]["weight_decay"] = 0.0
    groups: dict[str, Any] = optim.get("groups") or {}
    unknown = set(groups) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown optim.groups {sorted(unknown)}; valid parts are {PARTS}")
    out = {}
    for part in PARTS:
        given = dict(groups.get(part) or {})
        bad = set(given) - {"lr_mult", "weight_decay"}
        if bad:
            raise ValueError(f"unknown keys {sorted(bad)} in optim.groups.{part}; valid keys are lr_mult, weight_decay")
        out[part] = {k: float(given.get(k, v)) for k, v in default[part].items()}
    return out


def _no_decay(name: str, param: torch.nn.Parameter, embedding_ids: frozenset[int] = frozenset()) -> bool:
    """Biases, norms, gates, latents, time embeddings and embedding rows: never weight-decayed. Embedding rows are
    the weights of ``nn.Embedding`` modules (``embedding_ids``; GPT-2's ``wte`` / ``wpe`` hold no "embed" in their
    names) and parameters named so."""
    return (param.ndim < 2 or id(param) in embedding_ids or "embed" in name or "latents" in name
            or "time_emb" in name or "spatial_emb" in name)


def parameter_groups(model: torch.nn.Module, optim: dict) -> list[dict]:
    """AdamW groups per part (resampler, xattn, gates, dense_gates, lm, embeddings), each split into decay / no decay.

    Each part has ``lr = optim.lr * optim.groups.<part>.lr_mult`` and ``weight_decay =
    optim.groups.<part>.weight_decay`` on its matrices (no decay on biases, norms, latents, time
    embeddings and embedding rows: group ``<part>/no_decay``). Paper defaults (conf/train.yaml): no
    weight decay on the resampler; the gates' lr multiplier 1 (``optim.gate_lr_mult``; short budgets
    may want 10-20, as gates open slowly). Frozen parameters are left out.
    """
    lr = float(optim["lr"])
    settings = part_settings(optim)
    gate_params = {id(p) for p in getattr(model, "gate_parameters", lambda: [])()}
    embedding_ids = frozenset(id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_params:
            part = "dense_gates" if name.endswith("alpha_dense") else "gates"
        else:
            part = next((p for prefix, p in _PREFIXES.items() if name.startswith(prefix)), None)
            if part is None:
                raise ValueError(f"trainable parameter '{name}' belongs to no optimiser part "
                                 f"({sorted(_PREFIXES)}); freeze it or extend training/optim.py")
        s = settings[part]
        key = f"{part}/no_decay" if _no_decay(name, param, embedding_ids) or part.endswith("gates") else part
        wd = 0.0 if key.endswith("/no_decay") else s["weight_decay"]
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": wd, "lr": lr * s["lr_mult"]})
        group["params"].append(param)
    order = {p: i for i, p in enumerate(PARTS)}
    return sorted(groups.values(), key=lambda g: (order[g["name"].split("/")[0]], g["name"]))
