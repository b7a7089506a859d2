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
    The first ``skip`` measured steps are left out of the mean: they pay one-off warm-up. The times
    travel in the checkpoint, so a resumed run reports all of its steps; the first ``skip`` after a
    resume pay the warm-up again and are left out too.
    """

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.times: list[float] = []
        self.warmup: set[int] = set()  # indices in ``times`` of the warm-up steps (after the start and each resume)
        self.updates_per_step = 1
        self._last_step = None
        self._mark = None
        self._measured_since_start = 0

    def on_train_start(self, trainer, pl_module):
        self.updates_per_step = max(1, int(getattr(trainer.datamodule, "updates_per_cycle", 1) or 1))
        self._mark, self._last_step, self._measured_since_start = None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._mark is None:
            self._mark = time.perf_counter()
            self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - self._last_step >= self.updates_per_step:  # every source updated once
            now = time.perf_counter()
            if self._measured_since_start < self.skip:
                self.warmup.add(len(self.times))
            self._measured_since_start += 1
            self.times.append(now - self._mark)
            self._mark, self._last_step = now, trainer.global_step
            pl_module.log("train/step_time", self.times[-1], on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"times": list(self.times), "warmup": sorted(self.warmup)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.times = list(state_dict.get("times", []))
        self.warmup = set(state_dict.get("warmup", range(min(self.skip, len(self.times)))))

    @property
    def measured(self) -> list[float]:
        """The step times less the warm-up ones (all of them when there are no others)."""
        return [t for i, t in enumerate(self.times) if i not in self.warmup] or self.times

    @property
    def mean(self) -> float | None:
        measured = self.measured
        return statistics.fmean(measured) if measured else None

    @property
    def median(self) -> float | None:
        measured = self.measured
        return statistics.median(measured) if measured else None


class GateLogger(pl.Callback):
    """Logs tanh(alpha) of every gate (``gates/layer{i}/attn``, ``gates/layer{i}/ffw``) as training runs."""

    def __init__(self, every_n_steps: int = 10, updates_per_step: int = 1):
        self.every_n_steps = max(1, every_n_steps) * max(1, updates_per_step)
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.last = pl_module.model.gate_values()
            if self.last:
                pl_module.log_dict({f"gates/{k}": v for k, v in self.last.items()}, on_step=True, on_epoch=False)


class LossHistory(pl.Callback):
    """Mean training loss over each window of ``every_n_steps`` batches, for results.json and loss plots.

    The loss of a batch is the weighted one the update used (flamingo_lab.data.mixture.loss_scale). With
    ``data.optimisation=round_robin`` a batch holds one source and its loss is ``lambda_s L_s / mean lambda``:
    a window is then the mean over its sources of each source's mean, ``sum_s lambda_s L_s / sum_s lambda_s``
    as with ``accumulate``, whatever share of the window each source had (a plain mean would weigh a source
    by how many of its turns fell in the window, and the curve would swing with the phase of the cycle).
    The curve travels in the checkpoint, so a resumed run reports all of it.
    """

    def __init__(self, every_n_steps: int = 10, updates_per_step: int = 1, batches_per_update: int = 1):
        self.updates_per_step = max(1, updates_per_step)  # the curve's steps are training steps, not updates
        # a window is every_n_steps training steps of batches (trainer.accumulate_grad_batches per update)
        self.every_n_steps = max(1, every_n_steps) * self.updates_per_step * max(1, batches_per_update)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_loss: float | None = None
        self._window: dict[str, list[float]] = {}  # the window being filled; a point of its own only at the end
        self._window_step = 0

    @staticmethod
    def _sources(batch) -> str:
        if isinstance(batch, dict) and batch and "input_ids" not in batch:
            return ",".join(sorted(batch))  # {source: batch}: one source (round robin) or all (accumulate)
        return "data"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._window.setdefault(self._sources(batch), []).append(float(loss.detach()))
        self._window_step = trainer.global_step // self.updates_per_step
        if sum(map(len, self._window.values())) >= self.every_n_steps:
            self.steps.append(self._window_step)
            self.losses.append(self._mean(self._window))
            self._window = {}

    @staticmethod
    def _mean(window: dict[str, list[float]]) -> float:
        return statistics.fmean(statistics.fmean(v) for v in window.values())

    def on_validation_epoch_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val_loss = float(value)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses), "val_loss": self.val_loss,
                "window": {k: list(v) for k, v in self._window.items()}, "window_step": self._window_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.losses = list(state_dict["steps"]), list(state_dict["losses"])
        self.val_loss = state_dict.get("val_loss")
        self._window = {k: list(v) for k, v in state_dict.get("window", {}).items()}
        self._window_step = int(state_dict.get("window_step", self.steps[-1] if self.steps else 0))

    def summary(self) -> dict:
        """First and final window means of the training loss, the last validation loss and the curve. The window
        being filled when training ended is the curve's last point; it stays open in the checkpoint, so a run
        extended later (a larger ``trainer.max_steps``) fills it on as the uninterrupted longer run does."""
        steps, losses = list(self.steps), list(self.losses)
        if self._window:
            steps.append(self._window_step)
            losses.append(self._mean(self._window))
        return {
            "first": losses[0] if losses else None,
            "final": losses[-1] if losses else None,
            "val": self.val_loss,
            "curve": {"step": steps, "loss": losses},
        }


class EvalCurve(pl.Callback):
    """Few-shot accuracy against training steps: a light evaluation (a few tasks, few items) every
    ``every_n_steps`` optimiser steps and at the end, kept as ``points`` for results.json.

    ``eval_cfg`` is the run's whole ``eval`` config; ``tasks``, ``shots`` and ``max_items`` narrow it.
    Runs on rank 0 of a single-process run only (under DDP the other ranks would wait at the next step).
    """

    def __init__(self, root: str, eval_cfg: dict, every_n_steps: int, tasks, shots, max_items: int,
                 updates_per_step: int = 1):
        self.updates_per_step = max(1, int(updates_per_step))  # points at training steps (round robin: S updates)
        self.root, self.every_n_steps = root, max(1, int(every_n_steps)) * self.updates_per_step
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
        model = pl_module.model
        from flamingo_lab.training.sharding import is_sharded, unsharded_copy

        if is_sharded(trainer):  # trainer=fsdp on one process: the model's units run only inside its forward
            model = unsharded_copy(model, pl_module.cfg["model"], trainer.strategy.root_device)
        result = evaluate_model(model, self.root, self.cfg, progress=False)
        for cb in trainer.callbacks:  # evaluation time is not training time: keep it out of the step time
            if isinstance(cb, StepTimer) and cb._mark is not None:
                cb._mark += time.perf_counter() - started
        point = {"step": step // self.updates_per_step, "overall": result["overall"], "scores": {
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
        # step 0: the untrained gates (the LM alone); a resumed run adds no point the uninterrupted one has not
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        """The points so far travel in the checkpoint: a resumed run keeps them and evaluates none twice."""
        return {"points": list(self.points), "done": sorted(self._done)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = list(state_dict.get("points", []))
        self._done = set(state_dict.get("done", []))


class StopTogether(pl.Callback):
    """Signals act between training batches, on every rank at once, where the state is whole: SIGTERM (a
    preemption, a time limit, ``kill``) stops the run, and SLURM's requeue signal (auto-requeue) writes its
    ``hpc_ckpt_<n>.ckpt`` and requeues the job. Writing a checkpoint gathers every rank's stream positions (a
    collective call), so every rank must make it at the same point.

    The signal handlers only note the signal (SIGTERM is passed to the ranks Lightning launched, as Lightning's
    handler does). As each training batch that begins an update starts, the ranks agree (an all-reduce of their
    notes; one process needs none) and act together: after the previous step's callbacks, evaluation, saves and
    validation (which finish, and are in the state), never inside an accumulation of several batches (whose
    gradients no checkpoint holds). SIGTERM raises Lightning's ``SIGTERMException`` there
    (``InterruptCheckpoint`` writes the state); the requeue runs Lightning's own requeue (its checkpoint, then
    ``scontrol requeue``) there, and training goes on until SLURM stops the job. A SIGTERM during the last batch
    lets the run finish: the ranks agree once more as training ends, and ``stop_requested`` tells the caller,
    which writes the results and exits 143 all the same. Under round robin an update is one source's, so the
    state is that of the end of an update, not always of a whole step (a resume goes on at the next source).

    Lightning 2.6's own handlers act inside the signal handler, which runs wherever the main thread stands. Its
    SIGTERM handler broadcasts there (its PR #20825), often inside another collective (DDP's buffer broadcast or
    gradient all-reduce), so the ranks' collectives no longer paired up and a two-process run given SIGTERM hung
    until killed (10 minutes here, in DDP's forward and the handler's broadcast); each rank then raised at a
    batch's end on its own flag (its issue #20806). Its requeue handler writes the checkpoint there: just after
    an update that Lightning had not yet counted it held that update's weights under the step before (and under
    DDP it is a collective inside a handler too). Lightning's flag (``trainer.received_sigterm``) is left unset.
    """

    def __init__(self):
        self.signalled = False  # this rank's SIGTERM handler has run in this fit
        self.requeue_noted = False  # this rank's requeue handler has run since the last requeue
        self.stop_at: int | None = None  # the step at which the ranks stopped together
        self.stop_requested = False  # the ranks agreed to stop (before a batch, or as training ended)
        self._connector = None

    def on_fit_start(self, trainer, pl_module):
        import types

        self.signalled = self.requeue_noted = self.stop_requested = False
        self.stop_at = self._connector = None
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(connector, "_sigterm_notifier_fn") \
                or not hasattr(connector, "_slurm_sigusr_handler_fn"):
            return  # another Lightning: its own handling stays
        callback = self
        self._connector = connector

        def note_sigterm(connector, signum, frame) -> None:
            if not callback.signalled and connector.trainer.strategy.launcher is not None:
                connector.trainer.strategy.launcher.kill(signum)
            callback.signalled = True

        def note_requeue(connector, signum, frame) -> None:
            callback.requeue_noted = True

        # read by fit when it registers the handlers, after this hook
        connector._sigterm_notifier_fn = types.MethodType(note_sigterm, connector)
        connector._slurm_sigusr_handler_fn = types.MethodType(note_requeue, connector)

    def _agree(self, trainer) -> tuple[bool, bool]:
        """(stop, requeue): whether any rank noted SIGTERM / the requeue signal. Every rank must call it alike."""
        flags = [int(self.signalled), int(self.requeue_noted)]
        if trainer.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                agreed = torch.tensor(flags, device=trainer.strategy.root_device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                flags = [int(v) for v in agreed.tolist()]
        return bool(flags[0]), bool(flags[1])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._connector is None:
            return
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        finished = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if accumulate > 1 and finished % accumulate:
            return  # inside an accumulation: the same on every rank, so every rank agrees below or none does
        stop, requeue = self._agree(trainer)
        if requeue:
            import signal

            self.requeue_noted = False
            # Lightning's own requeue (its loggers finalised, hpc_ckpt_<n>.ckpt, scontrol requeue on rank 0), called
            # where every rank stands alike: the state of the finished step, this fetched batch set back
            type(self._connector)._slurm_sigusr_handler_fn(self._connector, signal.SIGUSR1, None)
        if stop:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            self.stop_requested, self.stop_at = True, trainer.global_step
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module):
        if self._connector is not None:
            self.stop_requested = self._agree(trainer)[0]  # a SIGTERM during the last batch, on any rank

    def stopped_together(self, trainer, exception: BaseException) -> bool:
        """Whether ``exception`` is the stop that every rank makes at the batch they agreed on."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        return isinstance(exception, SIGTERMException) and self.stop_at == trainer.global_step and trainer.training


class InterruptCheckpoint(pl.Callback):
    """Writes ``path`` (``checkpoints/interrupted.ckpt``) when training stops on an exception (an error, Ctrl-C,
    SIGTERM), so that the run, started again with ``resume=auto``, continues from there rather than from its last
    periodic checkpoint or from step 0. The state written is that of the last step the run finished (the
    DataModule's and the callbacks' states count only the batches of finished steps; Lightning raises SIGTERM's
    exception at the end of a batch, so that batch is in).

    It writes nothing where that state would not be whole: from the hook before the optimiser's update to the end
    of the batch's callbacks (the weights or moments may be half-updated, or the callbacks have not counted the
    batch); inside an accumulation of several batches (``trainer.accumulate_grad_batches``: the gradients of the
    batches before are in no checkpoint); before this start's first batch (the state is then the checkpoint it
    resumed from, or a restore or a read-through half done); at step 0; and with more than one process, but for
    SIGTERM, which stops every rank after the same batch (:class:`StopTogether`; writing gathers every rank's
    streams, so every rank must make the call: after an error on one rank, the others may never reach it). The file goes once the run
    finishes: the finished run's state supersedes it.
    """

    FILENAME = "interrupted.ckpt"

    def __init__(self, path: str, together: StopTogether | None = None):
        self.path, self.together = str(path), together
        self._armed = False  # a batch of this start has begun
        self._stepping = False  # between the hook before the update and the end of the batch's callbacks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._armed, self._stepping = True, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._stepping = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # after every callback of ours that counts the batch (Lightning moves ModelCheckpoint after this one;
        # a failure in its save leaves the finished step's state, which is whole)
        self._stepping = False

    def _why_not(self, trainer, exception: BaseException) -> str | None:
        if trainer.world_size > 1 and not (self.together and self.together.stopped_together(trainer, exception)):
            return f"with {trainer.world_size} processes (by {type(exception).__name__}, which may stop one rank alone)"
        if not self._armed:
            return "before this start's first batch"
        if self._stepping:
            return (f"between the optimiser's update of step {trainer.global_step + 1} and the end of its "
                    f"callbacks (the weights may be half-updated)")
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        processed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if accumulate > 1 and processed % accumulate:
            return (f"inside an accumulation of {accumulate} batches ({processed % accumulate} done; their gradients "
                    f"are in no checkpoint)")
        return None

    def on_exception(self, trainer, pl_module, exception):
        import logging

        log = logging.getLogger("flamingo_lab.training.run")
        if trainer.sanity_checking or trainer.global_step == 0:
            return  # nothing trained yet: the run starts again from the start anyway
        if not trainer.training:  # validation: Lightning's loops would resume inside it
            log.warning("%s during validation at step %d: no %s written; the run resumes from its last periodic "
                        "checkpoint", type(exception).__name__, trainer.global_step, self.FILENAME)
            return
        why_not = self._why_not(trainer, exception)
        if why_not is not None:
            log.warning("%s at step %d: no %s written %s; the run resumes from its last periodic checkpoint",
                        type(exception).__name__, trainer.global_step, self.FILENAME, why_not)
            return
        try:
            trainer.save_checkpoint(self.path)
        except Exception as error:  # never hide the run's own error behind this one
            log.warning("could not write %s: %s", self.path, error)
            if trainer.world_size > 1 and trainer.is_global_zero:
                # rank 0 writes the file: it failed before the save's closing barrier, where the others wait
                trainer.strategy.barrier("interrupted.ckpt not written")
            return
        log.warning("%s: the run's state at step %d is in %s; the same command resumes from it (resume=auto)",
                    type(exception).__name__, trainer.global_step, self.path)

    def on_fit_end(self, trainer, pl_module):
        """The finished run's last.ckpt supersedes the file (kept if it is the later state: a resumed run that had
        nothing left to train wrote none)."""
        import os

        import torch

        last = os.path.join(os.path.dirname(self.path), "last.ckpt")
        if not (trainer.is_global_zero and os.path.isfile(self.path)):
            return

        def step(path: str) -> int:
            try:
                return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))
            except Exception:  # noqa: BLE001 -- unreadable: not a state to keep
                return -1

        if os.path.isfile(last) and step(last) >= step(self.path):  # else it is the run's latest state
            os.remove(self.path)


class RunRecord(pl.Callback):
    """What every checkpoint records of the run beside its state: the fingerprint of the data it trains on
    (``data_fingerprint``, which a resume compares with the data at ``data.root``) and its ``attempts`` (when each
    start or resume began, from which step and checkpoint, with which command-line overrides, on which machine and
    code), so that a resumed run's results.json says how it was made, whatever Hydra's ``.hydra/`` folder holds
    after the last start rewrote it."""

    def __init__(self, data_fingerprint: str | None, attempts: list[dict], last_path: str | None = None):
        self.data_fingerprint, self.attempts, self.last_path = data_fingerprint, attempts, last_path
        self._validated_at: int | None = None  # the step of this fit's latest validation

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Lightning's loggers log at ``_batches_that_stepped``, which counts the updates made (global_step, here:
        one update a batch or an accumulation). Resumed from a state written after a step's validation and before
        the next batch (an interrupted.ckpt, a requeue's hpc_ckpt, the final last.ckpt of a run that validates
        on the way), Lightning counted that step once more: its restart takes such a state for one saved as the
        validation ended, before the count. The loggers then logged every later step one ahead."""
        loop = trainer.fit_loop.epoch_loop
        if pl_module.automatic_optimization and getattr(loop, "_batches_that_stepped", None) is not None \
                and loop._batches_that_stepped != trainer.global_step:
            loop._batches_that_stepped = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        """The final state as ``last_path`` (last.ckpt), on every rank (writing gathers their streams): the
        periodic saves miss the steps after the last multiple of their interval, and the validation that follows
        the last step, so a run extended or evaluated otherwise later resumed from an earlier state (trained
        those steps again, or reported no validation loss). ModelCheckpoint saves it itself when it saved
        nothing in this fit."""
        # decided from ModelCheckpoint's saves alone (the same on every rank; an hpc or interrupted save is not
        # the final state): its save at the last step comes before the validation that ends the run
        periodic = trainer.checkpoint_callback
        step = trainer.global_step
        if (self.last_path is None or step == 0 or periodic is None
                or not getattr(periodic, "_last_checkpoint_saved", "")
                or (getattr(periodic, "_last_global_step_saved", None) == step and self._validated_at != step)):
            return
        trainer.save_checkpoint(self.last_path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["data_fingerprint"] = self.data_fingerprint
        checkpoint["attempts"] = list(self.attempts)
        _before_batch_in_flight(checkpoint)


def _before_batch_in_flight(checkpoint: dict) -> None:
    """A checkpoint written while a batch trains (an exception's, or the SLURM requeue's from its signal handler)
    holds the streams and callbacks of before that batch (FlamingoDataModule.state_dict), but Lightning's loop
    counters say the batch was fetched and begun: resumed from it, Lightning counted that batch once more
    (``_batches_that_stepped``, the step its loggers log at, one ahead of the uninterrupted run's from there on;
    validation scheduled by batch count one batch early). Its counters are set back to the last finished batch,
    as if the checkpoint had been written between batches. (The weights are those of before the batch unless the
    SLURM signal landed inside the optimiser's update: Lightning saves from the handler wherever the step stands.)"""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    progress = loop.get("epoch_loop.batch_progress") or {}
    total = progress.get("total") or {}
    if not total or total.get("ready", 0) <= total.get("processed", 0):
        return  # between batches, or after the batch's update (Lightning's own restart handles that)
    for part in ("total", "current"):
        counts = progress.get(part) or {}
        for key in ("ready", "started"):
            if key in counts:
                counts[key] = counts["processed"]
    step = ((loop.get("epoch_loop.automatic_optimization.optim_progress") or {}).get("optimizer") or {}).get("step")
    for counts in (step or {}).values():
        if "ready" in counts and "completed" in counts:
            counts["ready"] = counts["completed"]
