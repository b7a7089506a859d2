"""A run stopped part way (an error, Ctrl-C, a killed sweep) continues where it stood when it is run again.

A run that stops on an exception writes ``checkpoints/interrupted.ckpt`` (its state before the batch in flight),
and ``resume=auto`` (the default) picks up the run folder's newest checkpoint when it was trained with the same
config on the same data. Before, a sweep run again retrained every unfinished run from step 0, and a run that
failed at step 49 of a 50-step checkpoint interval lost all 49.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from flamingo_lab.config import compose

from conftest import two_processes


def _quiet(world: Path, *extra: str) -> list[str]:  # as tests/test_train.py's
    return ["scale=tiny", f"data.root={world}", "logger=none", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "eval.at_end_of_training=false", "data.num_workers=0", *extra]


def _run(world: Path, run_dir: Path, steps: int, *extra: str) -> dict:
    from flamingo_lab.training.run import run

    return run(compose(_quiet(world, f"trainer.max_steps={steps}", *extra)), run_dir)


def _same_run(resumed: dict, whole: dict) -> None:
    assert resumed["steps"] == whole["steps"]
    assert resumed["loss"]["curve"]["loss"] == pytest.approx(whole["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)
    assert resumed["data"]["per_source"] == whole["data"]["per_source"]
    assert resumed["gates"] == pytest.approx(whole["gates"], rel=1e-5, abs=1e-7)


def _fail_once_at(monkeypatch, hook: str, step: int) -> None:
    """Make FlamingoModule's ``hook`` raise once, in the batch of training step ``step + 1``."""
    from flamingo_lab.training.module import FlamingoModule

    original = getattr(FlamingoModule, hook, None)
    fired = []

    def failing(self, *args, **kwargs):
        if self.trainer.global_step == step and not fired:
            fired.append(True)
            raise RuntimeError("worker node lost")
        return original(self, *args, **kwargs) if original is not None else None

    monkeypatch.setattr(FlamingoModule, hook, failing, raising=False)


def _logged_steps(monkeypatch) -> list[int]:
    """The step Lightning's loggers log at, as each fit ends (``_batches_that_stepped``)."""
    from flamingo_lab.training.module import FlamingoModule

    seen = []
    monkeypatch.setattr(FlamingoModule, "on_train_end",
                        lambda self: seen.append(self.trainer.fit_loop.epoch_loop._batches_that_stepped), raising=False)
    return seen


def test_a_run_stopped_by_an_error_continues_from_that_batch_when_run_again(tiny_world_dir, tmp_path, monkeypatch,
                                                                           caplog):
    logged = _logged_steps(monkeypatch)
    whole = _run(tiny_world_dir, tmp_path / "whole", 6)
    with monkeypatch.context() as m:
        _fail_once_at(m, "training_step", 3)  # step 4's forward
        with pytest.raises(RuntimeError, match="worker node lost"):
            _run(tiny_world_dir, tmp_path / "cut", 6)
    ckpt = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (tmp_path / "cut" / "checkpoints" / "last.ckpt").exists()  # periodic ones come every 50 steps
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["status"] == "failed"
    with caplog.at_level(logging.INFO, logger="flamingo_lab.training.run"):
        resumed = _run(tiny_world_dir, tmp_path / "cut", 6)  # the same command again: resume=auto
    assert "resuming" in caplog.text and "step 3" in caplog.text
    _same_run(resumed, whole)
    assert not ckpt.exists()  # the finished run's state supersedes it
    # the loggers' step goes on as the uninterrupted run's (before: the batch in flight was counted twice, 7 vs 6)
    assert logged == [6, 6]
    # results.json says how the run was made: started at step 0, resumed at step 3 from that checkpoint
    assert [(a["from_step"], a["checkpoint"]) for a in resumed["attempts"]] == [(0, None), (3, str(ckpt))]
    assert [a["from_step"] for a in whole["attempts"]] == [0]
    assert resumed["attempts"][1]["machine"]["cpu_capability"] == whole["machine"]["cpu_capability"]


def test_no_checkpoint_is_written_from_inside_an_update(tiny_world_dir, tmp_path, monkeypatch, caplog):
    """An error after the backward pass, once the optimiser may have begun to change the weights: a checkpoint
    then could hold half an update, so none is written and the run resumes from its last periodic one."""
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        _fail_once_at(m, "on_before_optimizer_step", 3)
        with pytest.raises(RuntimeError, match="worker node lost"):
            _run(tiny_world_dir, tmp_path, 6)
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()
    assert "optimiser's update" in caplog.text


def test_auto_starts_again_when_the_folder_holds_another_configs_checkpoint(tiny_world_dir, tmp_path, monkeypatch,
                                                                          caplog):
    whole = _run(tiny_world_dir, tmp_path / "whole", 6)
    _run(tiny_world_dir, tmp_path / "other", 4, "optim.lr=0.01")
    with caplog.at_level(logging.WARNING), monkeypatch.context() as m:
        _fail_once_at(m, "training_step", 3)
        with pytest.raises(RuntimeError, match="worker node lost"):
            _run(tiny_world_dir, tmp_path / "other", 6)  # trained from step 0, not from the other config's step 4
    assert "not resumed" in caplog.text and "optim.lr" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flamingo_lab.training.run"):
        again = _run(tiny_world_dir, tmp_path / "other", 6)
    # this run's own state (the other config's was moved aside when this run started from step 0)
    assert "resuming" in caplog.text and "step 3" in caplog.text
    _same_run(again, whole)
    # the other config's state was moved aside when this run started from step 0, and this run's own final
    # state is last.ckpt (before: Lightning wrote it to last-v1.ckpt, where no resume looks)
    final = torch.load(tmp_path / "other" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and final["hyper_parameters"]["cfg"]["optim"]["lr"] == 0.002
    (aside,) = (tmp_path / "other" / "previous-checkpoints").iterdir()
    before = torch.load(aside / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert before["global_step"] == 4 and before["hyper_parameters"]["cfg"]["optim"]["lr"] == 0.01
    assert not list((tmp_path / "other" / "checkpoints").glob("last-v*.ckpt"))


def test_a_resume_on_a_rewritten_world_is_refused(tiny_world_dir, tmp_path, caplog):
    """The config names the data by its folder only: a world rewritten there with other settings passed the
    config check, and the resumed run trained on other data than its first steps, silently."""
    from flamingo_lab.training.run import ResumeRefused

    world = tmp_path / "world"
    shutil.copytree(tiny_world_dir, world)
    whole = _run(world, tmp_path / "whole", 6)
    _run(world, tmp_path / "run", 4)
    manifest = json.loads((world / "world.json").read_text())
    manifest["config"]["vtp_moves"] = 0.6  # as `flamingo-data world.vtp_moves=0.6 out_dir=...` into the same folder
    (world / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeRefused, match="data.root"):
        _run(world, tmp_path / "run", 6, "resume=last")
    with caplog.at_level(logging.WARNING):
        again = _run(world, tmp_path / "run", 6)  # resume=auto: trains from the start
    assert "not resumed" in caplog.text
    assert again["steps"] == 6 and again["loss"]["curve"]["step"] == whole["loss"]["curve"]["step"]
    _same_run(again, whole)  # the shards are the same: only the manifest's settings changed


def test_force_trains_from_the_start(tiny_world_dir, tmp_path, monkeypatch):
    from flamingo_lab.training.module import FlamingoModule

    _run(tiny_world_dir, tmp_path, 4)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # the finished run's state, at step 4
    trained, step = [], FlamingoModule.training_step

    def counting(self, batch, batch_idx):
        trained.append(self.trainer.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FlamingoModule, "training_step", counting)
    assert _run(tiny_world_dir, tmp_path, 4, "force=true")["steps"] == 4
    assert trained == [0, 1, 2, 3]  # trained again from step 0, not resumed at the end


def test_a_finished_run_evaluated_otherwise_is_not_trained_again(tiny_world_dir, tmp_path, monkeypatch):
    """Only eval.* changed: the config key differs, so the run is not done, but its final checkpoint is this
    config's training; it resumes there, trains nothing and evaluates."""
    from flamingo_lab.training.module import FlamingoModule

    first = _run(tiny_world_dir, tmp_path, 4)
    trained, step = [], FlamingoModule.training_step

    def counting(self, batch, batch_idx):
        trained.append(self.trainer.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FlamingoModule, "training_step", counting)
    again = _run(tiny_world_dir, tmp_path, 4, "eval.at_end_of_training=true", "eval.max_items=2", "eval.shots=[0]",
                 "eval.tasks=[vqav2]")
    assert trained == [] and again["config_key"] != first["config_key"]
    assert again["loss"] == first["loss"] and again["gates"] == first["gates"]
    assert again["eval"]["metrics"]  # evaluated with the new settings


def test_the_run_folders_latest_state_is_chosen_among_its_checkpoints(tmp_path):
    """last.ckpt (every 50 steps), interrupted.ckpt (on an exception) and Lightning's SLURM requeue checkpoints
    (hpc_ckpt_<n>.ckpt in the run folder): resume=auto and resume=last take the one at the latest step."""
    from flamingo_lab.training.run import newest_checkpoint, run_checkpoints

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert newest_checkpoint(ckpts) is None
    for path, step in ((ckpts / "last.ckpt", 50), (ckpts / "interrupted.ckpt", 73), (tmp_path / "hpc_ckpt_1.ckpt", 60),
                       (tmp_path / "hpc_ckpt_10.ckpt", 80), (tmp_path / "hpc_ckpt_2.ckpt", 99)):
        torch.save({"global_step": step}, path)
    assert run_checkpoints(ckpts) == [(80, tmp_path / "hpc_ckpt_10.ckpt"), (73, ckpts / "interrupted.ckpt"),
                                      (50, ckpts / "last.ckpt")]  # the requeue's latest is its highest number
    torch.save({"global_step": 80}, ckpts / "last.ckpt")
    assert newest_checkpoint(ckpts) == ckpts / "last.ckpt"  # a tie: the periodic one


def test_a_checkpoint_past_max_steps_is_not_resumed(tiny_world_dir, tmp_path, caplog):
    """Resuming a 4-step run's final state as a 2-step run would train nothing and report 4 steps as the run of 2."""
    from flamingo_lab.training.run import ResumeRefused

    _run(tiny_world_dir, tmp_path / "run", 4)
    with pytest.raises(ResumeRefused, match=r"past trainer.max_steps=2"):
        _run(tiny_world_dir, tmp_path / "run", 2, "resume=last")
    with caplog.at_level(logging.WARNING):
        short = _run(tiny_world_dir, tmp_path / "run", 2)
    assert "not resumed" in caplog.text and short["steps"] == 2
    fresh = _run(tiny_world_dir, tmp_path / "fresh", 2)
    assert short["loss"]["curve"]["step"] == fresh["loss"]["curve"]["step"] == [1, 2]
    assert short["loss"]["curve"]["loss"] == pytest.approx(fresh["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)


def test_the_final_state_is_kept_whatever_the_checkpoint_interval(tiny_world_dir, tmp_path, monkeypatch):
    """Periodic checkpoints come every 50 steps; a 55-step run's last.ckpt held step 50, so evaluating it otherwise
    or extending it trained 5 steps again. The final state is now saved too."""
    from flamingo_lab.training.module import FlamingoModule

    _run(tiny_world_dir, tmp_path, 55, "trainer.log_every_n_steps=10")
    ckpts = tmp_path / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 55
    assert (ckpts / "epoch=0-step=50.ckpt").is_file()  # the periodic one is there too
    trained, step = [], FlamingoModule.training_step

    def counting(self, batch, batch_idx):
        trained.append(self.trainer.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FlamingoModule, "training_step", counting)
    _run(tiny_world_dir, tmp_path, 55, "trainer.log_every_n_steps=10", "eval.max_items=2")
    assert trained == []


def test_no_checkpoint_is_written_before_a_resumed_runs_first_batch(tiny_world_dir, tmp_path, monkeypatch):
    """An error while a resumed run restores or reads through (before its first batch) leaves the state it resumed
    from as it was: writing one then would record a restore or read-through half done."""
    from flamingo_lab.training.module import FlamingoModule

    whole = _run(tiny_world_dir, tmp_path / "whole", 6)
    with monkeypatch.context() as m:
        _fail_once_at(m, "training_step", 3)
        with pytest.raises(RuntimeError):
            _run(tiny_world_dir, tmp_path / "cut", 6)
    ckpt = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    written = ckpt.read_bytes()
    with monkeypatch.context() as m:
        _fail_once_at(m, "on_train_start", 3)  # the resumed fit, before its first batch
        with pytest.raises(RuntimeError):
            _run(tiny_world_dir, tmp_path / "cut", 6)
    assert ckpt.read_bytes() == written
    _same_run(_run(tiny_world_dir, tmp_path / "cut", 6), whole)


@pytest.mark.parametrize("fail_at_batch,written", [(4, True), (5, False)], ids=["between-updates", "mid-accumulation"])
def test_an_interrupted_accumulation_is_not_written(fail_at_batch, written, tiny_world_dir, tmp_path, monkeypatch,
                                                    caplog):
    """With trainer.accumulate_grad_batches=2, step 3 sums batches 4 and 5. Stopped in batch 5, batch 4's gradients
    are in no checkpoint, and a resume would update step 3 from batch 5 alone: nothing is written. Stopped in
    batch 4, the state is step 2's, whole."""
    from flamingo_lab.training.module import FlamingoModule

    extra = ["trainer.accumulate_grad_batches=2"]
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, *extra)
    step, fired = FlamingoModule.training_step, []

    def failing(self, batch, batch_idx):
        if batch_idx == fail_at_batch and not fired:
            fired.append(True)
            raise RuntimeError("worker node lost")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(FlamingoModule, "training_step", failing)
        with pytest.raises(RuntimeError):
            _run(tiny_world_dir, tmp_path / "cut", 6, *extra)
    ckpt = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    assert ckpt.exists() == written
    if not written:
        assert "inside an accumulation of 2 batches" in caplog.text
        return
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    _same_run(_run(tiny_world_dir, tmp_path / "cut", 6, *extra), whole)


def test_a_run_stopped_by_sigterm_exits_143_and_resumes_after_the_batch_it_finished(tiny_world_dir, tmp_path,
                                                                                    monkeypatch):
    """A cluster's preemption or timeout: Lightning finishes the batch and raises its SystemExit(), which exited 0,
    as a finished run does. The run now exits 143 (128 + SIGTERM) with its state at that step written."""
    import os
    import signal

    from flamingo_lab.training.module import FlamingoModule

    whole = _run(tiny_world_dir, tmp_path / "whole", 6)
    step, sent = FlamingoModule.training_step, []

    def signalled(self, batch, batch_idx):
        if self.trainer.global_step == 3 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; the batch goes on
        return step(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(FlamingoModule, "training_step", signalled)
        with pytest.raises(SystemExit) as stopped:
            _run(tiny_world_dir, tmp_path / "cut", 6)
    assert stopped.value.code == 143
    ckpt = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4  # step 4 finished
    _same_run(_run(tiny_world_dir, tmp_path / "cut", 6), whole)


def _sigterm_in_batch(monkeypatch, batch: int) -> None:
    """SIGTERM to this process in training batch ``batch`` (0-based, counted over the run)."""
    import os
    import signal

    from flamingo_lab.training.module import FlamingoModule

    step, sent = FlamingoModule.training_step, []

    def signalled(self, b, batch_idx):
        if self.trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 == batch and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, b, batch_idx)

    monkeypatch.setattr(FlamingoModule, "training_step", signalled)


def test_sigterm_inside_an_accumulation_stops_after_its_update(tiny_world_dir, tmp_path, monkeypatch):
    """With trainer.accumulate_grad_batches=2, step 3 sums batches 4 and 5. SIGTERM in batch 4 stopped the run at
    that batch's end, inside the accumulation, where no checkpoint is whole, so none was written (a paper scale
    accumulates many batches a step: almost every signal fell inside one). The run now finishes the update and
    writes its state at step 3."""
    extra = ["trainer.accumulate_grad_batches=2"]
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, *extra)
    with monkeypatch.context() as m:
        _sigterm_in_batch(m, 4)
        with pytest.raises(SystemExit) as stopped:
            _run(tiny_world_dir, tmp_path / "cut", 6, *extra)
    assert stopped.value.code == 143
    ckpt = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    _same_run(_run(tiny_world_dir, tmp_path / "cut", 6, *extra), whole)


def test_sigterm_in_the_last_step_lets_the_run_finish_and_still_exits_143(tiny_world_dir, tmp_path, monkeypatch):
    """SIGTERM in the last step's batch: Lightning raised inside the closing validation, so neither that
    validation nor the final state nor results.json was written. The run now finishes (its results are complete)
    and exits 143, so that a sweep stops as it was asked to."""
    whole = _run(tiny_world_dir, tmp_path / "whole", 6)
    with monkeypatch.context() as m:
        _sigterm_in_batch(m, 5)
        with pytest.raises(SystemExit) as stopped:
            _run(tiny_world_dir, tmp_path / "cut", 6)
    assert stopped.value.code == 143
    done = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert done["status"] == "complete" and done["loss"]["val"] == whole["loss"]["val"]
    _same_run(done, whole)
    assert not (tmp_path / "cut" / "checkpoints" / "interrupted.ckpt").exists()


def test_sigterm_before_a_validation_stops_after_it(tiny_world_dir, tmp_path, monkeypatch):
    """trainer.val_check_interval=2: SIGTERM in step 2's batch stopped the run inside the validation that follows,
    and no state was written (a validation is not resumable in the middle). The run now validates, stops after it
    with step 2's state, and the resumed run is the uninterrupted one: same losses, validations and logged steps."""
    extra = ["trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, *extra)
    with monkeypatch.context() as m:
        _sigterm_in_batch(m, 1)
        with pytest.raises(SystemExit):
            _run(tiny_world_dir, tmp_path / "cut", 6, *extra)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    with monkeypatch.context() as m:
        logged = _logged_steps(m)
        resumed = _run(tiny_world_dir, tmp_path / "cut", 6, *extra)
    _same_run(resumed, whole)
    assert resumed["data"]["val"]["passes"] == whole["data"]["val"]["passes"] == 3
    assert resumed["loss"]["val"] == pytest.approx(whole["loss"]["val"], rel=1e-6)
    assert logged == [6]  # the step the loggers log at as the resumed fit ends, as the uninterrupted run's


def test_a_run_that_validates_on_the_way_extended_logs_at_its_steps(tiny_world_dir, tmp_path, monkeypatch):
    """trainer.val_check_interval=2, a 4-step run extended to 6: its final state, written after step 4's
    validation, was restored by Lightning as one saved as that validation ended, and step 4 counted twice: the
    loggers logged steps 5 and 6 at 6 and 7."""
    extra = ["trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, *extra)
    with monkeypatch.context() as m:
        logged = _logged_steps(m)
        _run(tiny_world_dir, tmp_path / "run", 4, *extra)
        longer = _run(tiny_world_dir, tmp_path / "run", 6, *extra)
    assert logged == [4, 6]
    _same_run(longer, whole)


def test_a_slurm_requeue_writes_the_state_of_a_finished_step(tiny_world_dir, tmp_path, monkeypatch):
    """SLURM's requeue signal (USR1, auto-requeue) made Lightning write hpc_ckpt_<n>.ckpt from inside the signal
    handler, wherever the step stood: here just after step 4's update, before Lightning counted it, so the
    checkpoint held step 4's weights as step 3's, and a run resumed from it trained step 4 twice. The requeue now
    runs as the next batch starts: the checkpoint holds step 4 whole, and scontrol requeues the job (a stand-in
    scontrol here; the job is a fake SLURM one-task job)."""
    import os
    import signal
    import stat

    from flamingo_lab.training.module import FlamingoModule

    every = "trainer.log_every_n_steps=1"
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, every)
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    step, sent = FlamingoModule.optimizer_step, []

    def signalled(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.trainer.global_step == 3 and not sent:  # step 4's update made, global_step not yet counting it
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    with monkeypatch.context() as m:
        for k, v in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                     "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                     "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}.items():
            m.setenv(k, v)
        m.setattr(FlamingoModule, "optimizer_step", signalled)
        _run(tiny_world_dir, tmp_path / "cut", 6, every)
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = tmp_path / "cut" / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == 4
    _same_run(_run(tiny_world_dir, tmp_path / "again", 6, every, f"resume={hpc}"), whole)


def test_a_run_extended_to_more_steps_is_the_longer_run(tiny_world_dir, tmp_path):
    """trainer.max_steps=12 on a finished 7-step run trains steps 8-12 only, and its curve is the 12-step run's:
    the 7-step run closed its last loss window (steps 6-7) at its end, so the extension's windows were 8-12
    (points 5, 7, 12 against 5, 10, 12). The window being filled now stays open in the checkpoint."""
    every = "trainer.log_every_n_steps=5"
    whole = _run(tiny_world_dir, tmp_path / "whole", 12, every)
    short = _run(tiny_world_dir, tmp_path / "run", 7, every)
    assert short["loss"]["curve"]["step"] == [5, 7]  # the open window is the curve's last point
    longer = _run(tiny_world_dir, tmp_path / "run", 12, every)
    assert [a["from_step"] for a in longer["attempts"]] == [0, 7]
    assert longer["loss"]["curve"]["step"] == whole["loss"]["curve"]["step"] == [5, 10, 12]
    _same_run(longer, whole)


def test_resuming_an_earlier_state_sets_the_later_ones_aside(tiny_world_dir, tmp_path, monkeypatch):
    """resume=<path> to a state before the folder's latest (a rewind): the abandoned later states (last.ckpt,
    interrupted.ckpt, SLURM's hpc_ckpt_*) go to previous-checkpoints/, or a later resume=auto would take the
    abandoned run's later step for this one's."""
    every = "trainer.log_every_n_steps=1"
    whole = _run(tiny_world_dir, tmp_path / "whole", 6, every)
    _run(tiny_world_dir, tmp_path / "run", 4, every)
    early = tmp_path / "early.ckpt"
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", early)
    _run(tiny_world_dir, tmp_path / "run", 5, every)  # the abandoned continuation: last.ckpt at step 5
    torch.save({"global_step": 5}, tmp_path / "run" / "hpc_ckpt_1.ckpt")
    with monkeypatch.context() as m:
        _fail_once_at(m, "training_step", 4)  # the rewound run stops in step 5: interrupted.ckpt at step 4
        with pytest.raises(RuntimeError):
            _run(tiny_world_dir, tmp_path / "run", 6, every, f"resume={early}")
    (aside,) = (tmp_path / "run" / "previous-checkpoints").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["hpc_ckpt_1.ckpt", "last.ckpt"]
    assert torch.load(aside / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
    _same_run(_run(tiny_world_dir, tmp_path / "run", 6, every), whole)  # auto: from the rewound run's step 4


def test_an_unreadable_checkpoint_is_passed_over(tmp_path, caplog):
    from flamingo_lab.training.run import run_checkpoints

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 3}, tmp_path / "checkpoints" / "interrupted.ckpt")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    with caplog.at_level(logging.WARNING):
        assert run_checkpoints(tmp_path / "checkpoints") == [(3, tmp_path / "checkpoints" / "interrupted.ckpt")]
    assert "does not load" in caplog.text


@pytest.mark.slow
def test_a_two_process_run_keeps_its_final_state_too(tiny_world_dir, tmp_path):
    """Under DDP writing a checkpoint gathers every rank's stream positions, so the final save runs on every rank
    (in on_train_end, while the process group lives): a 55-step run's last.ckpt is step 55, not 50."""
    import os
    import subprocess
    import sys

    args = [*_quiet(tiny_world_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.precision=32-true", "trainer.max_steps=55", "trainer.log_every_n_steps=10"),
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "flamingo-train"), *args], cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 55
    assert sorted(final["FlamingoDataModule"]["positions_by_rank"]) == [0, 1]


def test_the_final_state_holds_the_final_validation(tiny_world_dir, tmp_path):
    """max_steps on the 50-step interval: Lightning's periodic save comes at step 50, before the validation that
    ends the run, so last.ckpt had no validation loss, and a run evaluated otherwise from it reported none."""
    done = _run(tiny_world_dir, tmp_path, 50)
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert done["loss"]["val"] is not None
    assert final["global_step"] == 50 and final["callbacks"]["LossHistory"]["val_loss"] == done["loss"]["val"]
    again = _run(tiny_world_dir, tmp_path, 50, "eval.max_items=2")  # eval.* only: resumed at 50, nothing trained
    assert again["loss"]["val"] == done["loss"]["val"] and again["data"] == done["data"]


def test_a_resumed_run_with_nothing_left_to_train_keeps_its_only_state(tiny_world_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _fail_once_at(m, "training_step", 3)
        with pytest.raises(RuntimeError):
            _run(tiny_world_dir, tmp_path, 6)
    ckpt = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert ckpt.exists() and not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert _run(tiny_world_dir, tmp_path, 3)["steps"] == 3  # resumed at its end: Lightning trains nothing
    assert ckpt.exists()  # before: deleted, and the folder kept no state of the run


@pytest.mark.parametrize("extra,updates", [("data.optimisation=round_robin", 16),
                                           ("trainer.accumulate_grad_batches=2", 4)], ids=["round-robin", "accumulate"])
def test_a_run_validates_once_at_its_end_and_windows_its_loss_by_steps(extra, updates, tiny_world_dir, tmp_path):
    """trainer.val_check_interval (${.max_steps}) and the loss curve's windows count steps; Lightning counts batches,
    and a round-robin step is one batch per source, an accumulating update k batches. So the round-robin row
    validated after every quarter of its steps (4 passes with 4 sources), a run accumulating 2 batches twice, and
    the latter's "2-step" loss windows held one step each."""
    done = _run(tiny_world_dir, tmp_path, 4, extra, "trainer.log_every_n_steps=2")
    assert done["updates"] == updates and done["data"]["val"]["passes"] == 1
    assert done["loss"]["curve"]["step"] == [2, 4]


_SIGNAL_AT_STEP = '''
import os, signal
from flamingo_lab.training.module import FlamingoModule

_step, _sent = FlamingoModule.training_step, []

def _signalled(self, batch, batch_idx):
    if self.trainer.global_step == {step} and self.trainer.global_rank == {rank} and not _sent:
        _sent.append(True)
        {kill}
    return _step(self, batch, batch_idx)

FlamingoModule.training_step = _signalled
'''


def _two_processes(world: Path, run_dir: Path, steps: int, env: dict | None = None, *extra: str):
    # one loader worker a source: a signal to every process reaches the workers too
    args = [*(a for a in _quiet(world) if not a.startswith("data.num_workers=")), "data.num_workers=1", "trainer=ddp"]
    return two_processes(args, run_dir, steps, env, *extra)


@pytest.fixture(scope="module")
def two_process_whole(tiny_world_dir, tmp_path_factory) -> dict:
    """An uninterrupted 7-step run on 2 processes."""
    run_dir = tmp_path_factory.mktemp("ddp") / "whole"
    proc = _two_processes(tiny_world_dir, run_dir, 7)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("rank, kill", [(0, "os.killpg(os.getpgid(0), signal.SIGTERM)"),  # a preemption: every process
                                        (1, "os.kill(os.getpid(), signal.SIGTERM)")],  # one rank alone
                         ids=["every process", "rank 1 alone"])
def test_a_two_process_run_stopped_by_sigterm_resumes_from_the_step_it_finished(rank, kill, two_process_whole,
                                                                                 tiny_world_dir, tmp_path):
    """A preempted multi-process job (SIGTERM, outside SLURM) stops every rank after the same batch, and the ranks
    write interrupted.ckpt together (writing gathers their stream positions). Before, Lightning's handler
    broadcast from inside the signal handler, and the run hung until killed, whether every process or rank 1
    alone had the signal; and no rank wrote interrupted.ckpt under DDP, so the run would have resumed from its
    last periodic checkpoint (here: from step 0)."""
    import os
    import signal

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGNAL_AT_STEP.format(step=3, rank=rank, kill=kill))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cut = _two_processes(tiny_world_dir, tmp_path / "cut", 7, env)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-4000:]
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # step 4 finished on both ranks
    assert sorted(ckpt["FlamingoDataModule"]["positions_by_rank"]) == [0, 1]
    resumed = _two_processes(tiny_world_dir, tmp_path / "cut", 7)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    result = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [a["from_step"] for a in result["attempts"]] == [0, 4]
    _same_run(result, two_process_whole)


@pytest.mark.slow
def test_a_two_process_run_signalled_in_its_last_step_finishes_and_exits_143(two_process_whole, tiny_world_dir,
                                                                              tmp_path):
    """SIGTERM to rank 1 alone in the last step: the ranks agree as training ends, so rank 0, which was not
    signalled, writes the complete results and exits 143 too (a sweep stops), and rank 1 exits 0 (Lightning's
    launcher SIGKILLs every rank, rank 0 included, when a rank it launched exits non-zero)."""
    import os
    import signal

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGNAL_AT_STEP.format(step=6, rank=1,
                                                                  kill="os.kill(os.getpid(), signal.SIGTERM)"))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cut = _two_processes(tiny_world_dir, tmp_path / "cut", 7, env)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-4000:]
    result = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert result["status"] == "complete"
    _same_run(result, two_process_whole)


_REQUEUE_AT_STEP = '''
import os, signal
from flamingo_lab.training.module import FlamingoModule

_step, _sent = FlamingoModule.optimizer_step, []

def _signalled(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    if self.trainer.global_step == 3 and self.trainer.global_rank == 0 and not _sent:
        _sent.append(True)
        os.killpg(os.getpgid(0), signal.SIGUSR1)  # SLURM signals every task of the job step
    return out

FlamingoModule.optimizer_step = _signalled
'''


@pytest.mark.slow
def test_a_two_task_slurm_requeue_writes_a_whole_step_on_both_ranks(two_process_whole, tiny_world_dir, tmp_path):
    """A 2-task SLURM job (srun's two processes: a fake job here, with a stand-in scontrol) given the requeue
    signal just after step 4's update: Lightning wrote hpc_ckpt_<n>.ckpt from inside the signal handler on each
    rank, a collective call inside a handler that runs wherever the main thread stands. Now the ranks write it
    together between batches: step 4, both ranks' stream positions; rank 0 requeues the job once, training goes
    on, and a run resumed from the checkpoint is the uninterrupted one."""
    import contextlib
    import os
    import signal
    import socket
    import stat
    import subprocess
    import sys

    hook, bin_dir, calls = tmp_path / "hook", tmp_path / "bin", tmp_path / "scontrol-calls"
    hook.mkdir()
    bin_dir.mkdir()
    (hook / "sitecustomize.py").write_text(_REQUEUE_AT_STEP)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "job"
    args = [*(a for a in _quiet(tiny_world_dir) if not a.startswith("data.num_workers=")), "data.num_workers=1",
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.max_steps=7", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               SLURM_NNODES="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="4242", SLURM_NODEID="0",
               SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    command = [str(Path(sys.executable).parent / "flamingo-train"), *args]
    ranks, outputs = [], None
    try:
        for rank in (0, 1):  # srun's tasks: one process group, as the job step's
            group = {"process_group": ranks[0].pid if ranks else 0}
            ranks.append(subprocess.Popen(command, cwd=tmp_path, env=dict(env, SLURM_PROCID=str(rank),
                                                                          SLURM_LOCALID=str(rank)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **group))
        outputs = [p.communicate(timeout=240) for p in ranks]
    except subprocess.TimeoutExpired:
        os.killpg(ranks[0].pid, signal.SIGKILL)
        pytest.fail("the 2-task job hung (killed after 240 s): " + ranks[0].communicate()[1][-3000:])
    finally:
        if outputs is None and ranks:  # rank 1 never started: rank 0 would wait for it forever
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ranks[0].pid, signal.SIGKILL)
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]  # by rank 0 alone
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    ckpt = torch.load(hpc, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert sorted(ckpt["FlamingoDataModule"]["positions_by_rank"]) == [0, 1]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"  # it trained on to the end
    again = tmp_path / "again"
    proc = _two_processes(tiny_world_dir, again, 7, None, f"resume={hpc}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_run(json.loads((again / "results.json").read_text()), two_process_whole)
