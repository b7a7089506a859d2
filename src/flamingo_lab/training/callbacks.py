"""Callbacks that record what Table 3 reports: parameter counts, step time, gate values, loss curves."""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl


class StepTimer(pl.Callback):
    """Wall time of one update over all training sources (the paper's step time), data loading included.

    With ``data.optimisation=accumulate`` every optimiser step sees every source, so a step is one
    optimiser step. With ``round_robin`` each optimiser step sees one source, so a step is the
    ``S`` consecutive optimiser steps that see every source once (``datamodule.updates_per_cycle``).
    The first ``skip`` measured steps are left out of the mean: they pay one-off warm-up.
    """

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.times: list[float] = []
        self.updates_per_step = 1
        self._last_step = None
        self._mark = None

    def on_train_start(self, trainer, pl_module):
        self.updates_per_step = max(1, int(getattr(trainer.datamodule, "updates_per_cycle", 1) or 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._mark is None:
            self._mark = time.perf_counter()
            self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - self._last_step >= self.updates_per_step:  # every source updated once
            now = time.perf_counter()
            self.times.append(now - self._mark)
            self._mark, self._last_step = now, trainer.global_step
            pl_module.log("train/step_time", self.times[-1], on_step=True, on_epoch=False)

    @property
    def mean(self) -> float | None:
        measured = self.times[self.skip :] or self.times
        return statistics.fmean(measured) if measured else None

    @property
    def median(self) -> float | None:
        measured = self.times[self.skip :] or self.times
        return statistics.median(measured) if measured else None


class GateLogger(pl.Callback):
    """Logs tanh(alpha) of every gate (``gates/layer{i}/attn``, ``gates/layer{i}/ffw``) as training runs."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, every_n_steps)
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.last = pl_module.model.gate_values()
            if self.last:
                pl_module.log_dict({f"gates/{k}": v for k, v in self.last.items()}, on_step=True, on_epoch=False)


class LossHistory(pl.Callback):
    """Mean training loss over each window of ``every_n_steps`` batches, for results.json and loss plots."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, every_n_steps)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_loss: float | None = None
        self._window: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._window.append(float(loss.detach()))
        step = trainer.global_step
        if len(self._window) >= self.every_n_steps or step >= (trainer.max_steps or float("inf")):
            self.steps.append(step)
            self.losses.append(statistics.fmean(self._window))
            self._window = []

    def on_validation_epoch_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val_loss = float(value)

    def summary(self) -> dict:
        """First and final window means of the training loss, the last validation loss and the curve."""
        return {
            "first": self.losses[0] if self.losses else None,
            "final": self.losses[-1] if self.losses else None,
            "val": self.val_loss,
            "curve": {"step": self.steps, "loss": self.losses},
        }
