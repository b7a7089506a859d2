"""The LightningModule: builds the Flamingo from the config it holds, so a checkpoint reloads on its own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from flamingo_lab.data.mixture import loss_scale, updates_per_step
from flamingo_lab.models import build_flamingo
from flamingo_lab.training.optim import parameter_groups


def batch_seed(seed: int, batch: int, rank: int = 0) -> int:
    """The seed of training batch ``batch`` (counted over the whole run) on process ``rank``: well mixed, so that
    neighbouring seeds, batches or ranks give unrelated generators (``seed * K + batch`` would give seed 1's first
    batch to seed 0 at batch K)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(batch)]).generate_state(1, dtype=np.uint64)[0])


class FlamingoModule(pl.LightningModule):
    """Trains a Flamingo built from ``cfg['model']``; ``cfg`` is the whole resolved run config (a dict)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.model = build_flamingo(cfg["model"])

    def configure_model(self):
        """Under ``trainer=fsdp`` (:mod:`flamingo_lab.training.sharding`), shard the model over the processes;
        under every other strategy, nothing."""
        from flamingo_lab.training.sharding import is_sharded, shard_flamingo

        # not self.trainer: Lightning's load_from_checkpoint (flamingo-eval) calls the hook with no trainer attached
        if is_sharded(self._trainer) and not getattr(self, "_sharded", False):
            shard_flamingo(self.model, self.device_mesh["data_parallel"])
            self._sharded = True  # Lightning calls the hook again for each stage (fit, then validate, ...)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(
            batch["input_ids"],
            images=batch["images"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )

    @staticmethod
    def _per_source(batch) -> dict[str, dict]:
        """``{source: batch}`` from the training loaders; a single batch counts as one source."""
        if isinstance(batch, dict) and "input_ids" in batch:
            return {"data": batch}
        return dict(batch)

    def on_train_batch_start(self, batch, batch_idx):
        """Seed the global generator (CPU and every GPU) for this training batch from (seed, batch, rank).

        A trained LM with dropout (a real GPT-2 loaded by ``model.lm.path`` has 0.1 in its config; the LM-trained
        rows train it) draws its masks from
        the global generator, whose state a checkpoint does not hold and which the loaders, the validation at the
        cut and Lightning also draw from in an order a resumed run does not repeat; so a resumed run trained with
        other masks than the uninterrupted one. Seeded per batch, as fairseq seeds each update
        (``utils.torch_seed(seed, num_updates)``), the masks of a batch depend only on the run's seed and where
        the batch stands in the run, and a resumed run is the uninterrupted one. The frozen parts run in eval
        mode and the built LMs have no dropout, so runs that draw nothing here are unchanged by it.
        """
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        # checkpoints are written after an update, so a resumed run's first batch starts an accumulation whether
        # Lightning carries batch_idx on (it does in 2.6) or restarts it
        index = int(self.trainer.global_step) * accumulate + batch_idx % accumulate
        torch.manual_seed(batch_seed(int(self.cfg.get("seed", 0)), index, int(self.global_rank)))

    def training_step(self, batch, batch_idx):
        """Weighted sum of the per-source losses (data.optimisation: all sources, or one in turn)."""
        scale = self._loss_scale
        loss = None
        for source, b in self._per_source(batch).items():
            loss_s = self(b).loss
            self.log(f"train/loss_{source}", loss_s, batch_size=b["input_ids"].shape[0])
            term = scale.get(source, 1.0) * loss_s
            loss = term if loss is None else loss + term
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        source = batch["source"][0] if isinstance(batch.get("source"), (list, tuple)) else "data"
        loss = self(batch).loss
        n = batch["input_ids"].shape[0]
        self.log(f"val/loss_{source}", loss, sync_dist=True, batch_size=n)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)  # mean over every source's samples
        return loss

    @property
    def _loss_scale(self) -> dict[str, float]:
        if not hasattr(self, "_scale_cache"):
            data = self.cfg.get("data", {})
            self._scale_cache = loss_scale(data) if data.get("sources") else {}
        return self._scale_cache

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as the trainer says (the paper: global norm 1.0). Lightning's FSDP precision refuses to clip
        by norm (Lightning issue #19235: the norm over all shards needs the wrapped module), so under FSDP
        the wrapped module's own ``clip_grad_norm_`` does it; every other strategy takes Lightning's path."""
        from lightning.pytorch.strategies import FSDPStrategy

        if (gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm"
                and isinstance(self.trainer.strategy, FSDPStrategy)):
            self.trainer.strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        optim = self.cfg["optim"]
        groups = parameter_groups(self.model, optim)
        optimizer = torch.optim.AdamW(groups, lr=float(optim["lr"]), betas=tuple(optim["betas"]))
        # warm-up counts training steps: a round-robin step of S updates (data.round_robin_step) warms up S times
        data = self.cfg.get("data", {})
        warmup = max(int(optim["warmup_steps"]), 0) * (updates_per_step(data) if data.get("sources") else 1)

        def linear_warmup_then_constant(step: int) -> float:  # paper: linear warm-up, then constant
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_constant)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
