"""The LightningModule: builds the Flamingo from the config it holds, so a checkpoint reloads on its own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from flamingo_lab.models import build_flamingo


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


class FlamingoModule(pl.LightningModule):
    """Trains a Flamingo built from ``cfg['model']``; ``cfg`` is the whole resolved run config (a dict)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.model = build_flamingo(cfg["model"])

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(
            batch["input_ids"],
            images=batch["images"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        optim = self.cfg["optim"]
        groups = parameter_groups(self.model, optim)
        optimizer = torch.optim.AdamW(groups, lr=float(optim["lr"]), betas=tuple(optim["betas"]))
        warmup = max(int(optim["warmup_steps"]), 0)

        def linear_warmup_then_constant(step: int) -> float:  # paper: linear warm-up, then constant
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_constant)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
