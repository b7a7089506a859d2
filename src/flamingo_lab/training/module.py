"""The LightningModule: builds the Flamingo from the config it holds, so a checkpoint reloads on its own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from flamingo_lab.models import build_flamingo
from flamingo_lab.training.optim import parameter_groups


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
