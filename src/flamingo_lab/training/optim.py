"""AdamW parameter groups per part of the Flamingo."""

from __future__ import annotations

import torch


def parameter_groups(model: torch.nn.Module, optim: dict) -> list[dict]:
    """AdamW groups per part, each with its own weight decay and learning rate.

    - resampler: ``resampler_weight_decay`` (paper: none on the Perceiver Resampler);
    - gates (the tanh alphas): no weight decay, learning rate x ``gate_lr_mult``;
    - everything else trainable: ``weight_decay`` on matrices, none on biases, norms, latents,
      time embeddings and the new token rows (1-D or 0-D tensors and embeddings).
    """
    lr, wd = float(optim["lr"]), float(optim["weight_decay"])
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": wd, "lr": lr},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr},
        "resampler": {"params": [], "weight_decay": float(optim["resampler_weight_decay"]), "lr": lr},
        "gates": {"params": [], "weight_decay": 0.0, "lr": lr * float(optim["gate_lr_mult"])},
    }
    gate_params = {id(p) for p in getattr(model, "gate_parameters", lambda: [])()}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_params:
            group = "gates"
        elif name.startswith("resampler."):
            group = "resampler"
        elif param.ndim < 2 or "embed" in name or "latents" in name:
            group = "no_decay"
        else:
            group = "decay"
        groups[group]["params"].append(param)
    return [dict(name=k, **g) for k, g in groups.items() if g["params"]]
