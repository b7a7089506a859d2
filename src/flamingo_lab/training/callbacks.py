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


class EvalCurve(pl.Callback):
    """Few-shot accuracy against training steps: a light evaluation (a few tasks, few items) every
    ``every_n_steps`` optimiser steps and at the end, kept as ``points`` for results.json.

    ``eval_cfg`` is the run's whole ``eval`` config; ``tasks``, ``shots`` and ``max_items`` narrow it.
    Runs on rank 0 of a single-process run only (under DDP the other ranks would wait at the next step).
    """

    def __init__(self, root: str, eval_cfg: dict, every_n_steps: int, tasks, shots, max_items: int):
        self.root, self.every_n_steps = root, max(1, int(every_n_steps))
        self.cfg = {**eval_cfg, "tasks": list(tasks) if tasks else None, "shots": list(shots),
                    "max_items": int(max_items), "task_max_items": {}}
        self.points: list[dict] = []
        self._done: set[int] = set()

    def _evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step in self._done or trainer.world_size > 1:
            return
        from flamingo_lab.eval import evaluate_model

        self._done.add(step)
        started = time.perf_counter()
        result = evaluate_model(pl_module.model, self.root, self.cfg, progress=False)
        for cb in trainer.callbacks:  # evaluation time is not training time: keep it out of the step time
            if isinstance(cb, StepTimer) and cb._mark is not None:
                cb._mark += time.perf_counter() - started
        point = {"step": step, "overall": result["overall"], "scores": {
            task: {k: {"score": r["score"], "breakdown": r.get("breakdown", {})} for k, r in per_k.items()}
            for task, per_k in result["scores"].items()}}
        self.points.append(point)
        flat = {f"curve/{t}_{k}shot": r["score"] for t, per_k in point["scores"].items() for k, r in per_k.items()}
        if trainer.logger:
            trainer.logger.log_metrics(flat, step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._evaluate(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)  # step 0: the untrained gates (the LM alone)
