"""A resumed run passes over what it already trained on without decoding it, and is still the uninterrupted run.

Each stream sets itself where the checkpoint says its DataLoader worker stood (raw samples taken from its
shuffle buffer) and the loader's batches are put back in the uninterrupted run's worker order. Before, a
resumed run decoded and collated every batch it had trained on again, only to drop it: hours at step 100k.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flamingo_lab.config import compose

SLOWER = "read through"  # in the log line of a resume that decodes what it passes over (FlamingoDataModule)


def _quiet(world: Path, *extra: str) -> list[str]:  # as tests/test_train.py's
    return ["scale=tiny", f"data.root={world}", "logger=none", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "eval.at_end_of_training=false", *extra]


class _Decodes:
    """Counts the training samples decoded in this process (with data.num_workers=0 the streams run here)."""

    def __init__(self, monkeypatch):
        from flamingo_lab.data import shards

        self.n = 0
        decode = shards.decode_sample

        def counting(raw: dict) -> dict:
            self.n += "/train/" in str(raw.get("__url__", ""))
            return decode(raw)

        monkeypatch.setattr(shards, "decode_sample", counting)

    def during(self, fn, *args):
        before = self.n
        out = fn(*args)
        return out, self.n - before


def _train(world: Path, run_dir: Path, steps: int, extra: list[str], resume: bool = False) -> dict:
    from flamingo_lab.training.run import train

    return train(compose(_quiet(world, f"trainer.max_steps={steps}", *(["resume=last"] if resume else []), *extra)),
                 run_dir)


def _same_run(resumed: dict, whole: dict) -> None:
    assert resumed["steps"] == whole["steps"]
    assert resumed["loss"]["curve"]["loss"] == pytest.approx(whole["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)
    assert resumed["data"]["per_source"] == whole["data"]["per_source"]


LAYOUTS = {  # data.num_workers, optimisation, cut step (of 10)
    # one process: every stream is worker 0's
    "0-workers-accumulate": (0, ["data.optimisation=accumulate"], 4),
    "1-worker-round-robin": (1, ["data.optimisation=round_robin", "++data.round_robin_step=update"], 5),
    # 5 batches per source: the next batch is worker 1's, so each block of two batches is turned round
    "2-workers-accumulate": (2, ["data.optimisation=accumulate"], 5),
    # one update per step: m3w has delivered 2 batches (next from worker 0), the others 1 (next from worker 1,
    # and worker 1 has no position yet)
    "2-workers-round-robin": (2, ["data.optimisation=round_robin", "++data.round_robin_step=update"], 5),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_resumed_run_passes_over_the_trained_batches_undecoded_and_is_the_uninterrupted_one(
        layout, tiny_world_dir, tmp_path, monkeypatch, caplog):
    workers, extra, cut = layout
    extra = [f"data.num_workers={workers}", *extra]
    decodes = _Decodes(monkeypatch)
    whole, decoded_whole = decodes.during(_train, tiny_world_dir, tmp_path / "whole", 10, extra)
    cut_run, _ = decodes.during(_train, tiny_world_dir, tmp_path / "cut", cut, extra)
    with caplog.at_level(logging.WARNING, logger="flamingo_lab.training.datamodule"):
        resumed, decoded_resumed = decodes.during(_train, tiny_world_dir, tmp_path / "cut", 10, [*extra], True)

    _same_run(resumed, whole)
    assert SLOWER not in caplog.text  # the quick way, not the fallback
    if workers == 0:  # it decodes what the uninterrupted run decodes after the cut, not what came before again
        tried = cut_run["data"]["seen_total"] + cut_run["data"]["skipped_total"]
        assert tried >= 40 and decoded_resumed == decoded_whole - tried


def test_a_checkpoint_without_stream_positions_still_resumes_exactly(tiny_world_dir, tmp_path, caplog):
    """Checkpoints written before the positions were kept resume the slow way (the same batches, decoded again),
    and the batches read through note the positions, so the next resume is the quick one. With two workers, cut
    at step 4 and resumed to 5, worker 1 delivers nothing after the resume: its position can only come from the
    read-through."""
    def positions(run_dir: Path) -> dict:
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return ckpt["FlamingoDataModule"]["positions"]  # our own checkpoint

    extra = ["data.num_workers=2"]
    whole = _train(tiny_world_dir, tmp_path / "whole", 5, extra)
    _train(tiny_world_dir, tmp_path / "cut", 4, extra)
    path = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt["FlamingoDataModule"]
    assert state["positions"] and state["layout"]["num_workers"] == 2
    del state["positions"], state["layout"]
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="flamingo_lab.training.datamodule"):
        resumed = _train(tiny_world_dir, tmp_path / "cut", 5, extra, True)

    _same_run(resumed, whole)
    assert "holds no stream positions" in caplog.text and SLOWER in caplog.text
    noted = positions(tmp_path / "cut")
    assert all(set(p) == {0, 1} for p in noted.values())  # worker 1's from the batches read through
    assert noted == positions(tmp_path / "whole")


def test_rotated_turns_every_block_of_workers_batches_to_start_at_the_given_worker():
    from flamingo_lab.training.datamodule import _Rotated

    assert list(_Rotated(range(9), workers=3, first=1)) == [1, 2, 0, 4, 5, 3, 7, 8, 6]
    assert list(_Rotated(range(6), workers=2, first=0)) == list(range(6))
    assert list(_Rotated(range(5), workers=2, first=1)) == [1, 0, 3, 2, 4]  # a short last block as it comes
    reads = []
    rotated = iter(_Rotated(map(reads.append, range(4)), workers=2, first=1))
    assert reads == []  # nothing read until the first batch is asked for (Lightning's iter() to check)
    next(rotated)
    assert len(reads) == 2


@pytest.mark.slow
def test_a_resumed_two_process_run_passes_over_each_ranks_batches_and_is_the_uninterrupted_one(tiny_world_dir,
                                                                                             tmp_path):
    """Under DDP each rank reads its own part of the shards, so each has its own stream positions, and Lightning
    saves rank 0's state alone: the positions of every rank are gathered into the checkpoint, and each resumed
    rank passes over its own. Before, a run of several processes always read through what it had trained on."""
    import json
    import os
    import subprocess
    import sys

    def run(folder: str, steps: int, *extra: str):
        args = _quiet(tiny_world_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.precision=32-true", f"trainer.max_steps={steps}", f"hydra.run.dir={tmp_path / folder}",
                      *extra)
        proc = subprocess.run([str(Path(sys.executable).parent / "flamingo-train"), *args], cwd=tmp_path,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline"), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((tmp_path / folder / "results.json").read_text()), proc.stdout + proc.stderr

    whole, _ = run("whole", 6)
    run("cut", 3)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    by_rank = ckpt["FlamingoDataModule"]["positions_by_rank"]
    assert sorted(by_rank) == [0, 1] and all(by_rank[r]["m3w"] for r in (0, 1))  # every rank's, from rank 0's file
    resumed, log = run("cut", 6, "resume=last")
    assert resumed["world_size"] == 2
    assert resumed["loss"]["curve"]["loss"] == pytest.approx(whole["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)
    assert SLOWER not in log


def test_a_checkpoint_written_while_a_batch_trains_resumes_from_that_batch(tiny_world_dir, tmp_path, monkeypatch):
    """Lightning's SLURM requeue writes its checkpoint from a signal handler, wherever the step stands. The streams'
    counts and positions were noted as a batch reached the step, so a checkpoint written before the step had
    updated (global_step still the step before) said the batch was trained on, and the resumed run left it out.
    The state a checkpoint takes while a batch trains is now the one from before that batch."""
    from flamingo_lab.training.module import FlamingoModule

    extra = ["data.num_workers=0"]
    logged = []  # the step Lightning's loggers log at as each fit ends: the resumed run's must be the whole run's
    monkeypatch.setattr(FlamingoModule, "on_train_end",
                        lambda self: logged.append(self.trainer.fit_loop.epoch_loop._batches_that_stepped), raising=False)
    whole = _train(tiny_world_dir, tmp_path / "whole", 6, extra)
    mid = tmp_path / "mid.ckpt"

    def save_mid_step(self, optimizer):  # after step 3's backward, before its update
        if self.trainer.global_step == 2 and not mid.exists():
            self.trainer.save_checkpoint(mid)

    with monkeypatch.context() as m:
        m.setattr(FlamingoModule, "on_before_optimizer_step", save_mid_step, raising=False)
        _train(tiny_world_dir, tmp_path / "cut", 3, extra)
    assert torch.load(mid, map_location="cpu", weights_only=False)["global_step"] == 2
    resumed = _train(tiny_world_dir, tmp_path / "cut", 6, [*extra, f"resume={mid}"])
    _same_run(resumed, whole)
    assert logged[0] == logged[-1] == 6  # before: 7, the batch in flight counted twice
