"""Sharded training (``trainer=fsdp``: FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes.

Before, ``trainer=fsdp`` was Lightning's FSDP1, which builds only on GPUs: sharding over several processes had
never run. On 2 CPU processes, FSDP2 crashed at the first step, where the gate logger read a gate that rank 1
held none of, and the evaluation at the end of training ran on rank 0 with sharded parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import two_processes

pytestmark = pytest.mark.slow


def _args(world: Path, trainer: str, *extra: str) -> list[str]:
    # gradient_clip_val 0.05: clipping acts at every step (with 1.0 the same DDP run ends with other gates:
    # layer0/attn -0.01010 against -0.01074), so the runs agree only if the shards' norms make the global norm.
    # data.val_batches=100: validation reads every batch the ranks have
    return [f"trainer={trainer}", "scale=tiny", f"data.root={world}", "logger=none", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.gradient_clip_val=0.05",
            "data.val_batches=100", *extra]


def _uneven_world(tiny_world_dir: Path, out: Path) -> Path:
    """The tiny world with m3w's validation shards listed unevenly (0, 1, 2, 3, 0, 1, 2): rank 0 reads 4 of them
    (2 batches), rank 1 reads 3 (1 batch and a short one), as real shards of unequal sizes give."""
    import shutil

    shutil.copytree(tiny_world_dir, out)
    manifest = json.loads((out / "world.json").read_text())
    m3w = manifest["shards"]["val"]["m3w"]
    assert len(m3w) == 4
    manifest["shards"]["val"]["m3w"] = m3w + m3w[:3]
    (out / "world.json").write_text(json.dumps(manifest))
    return out


_RECORD_EVALUATED = """
import os, torch
import flamingo_lab.training.sharding as sharding

_copy = sharding.unsharded_copy

def _recorded(*args, **kwargs):
    copy = _copy(*args, **kwargs)
    if copy is not None:  # rank 0: the model the evaluation at the end of training scores
        torch.save(copy.state_dict(), os.environ["EVALUATED_STATE"])
    return copy

sharding.unsharded_copy = _recorded
"""


_SIGTERM_AT_STEP_3 = """
import os, signal
from flamingo_lab.training.module import FlamingoModule

_step, _sent = FlamingoModule.training_step, []

def _signalled(self, batch, batch_idx):
    if self.trainer.global_step == 2 and self.trainer.global_rank == 0 and not _sent:
        _sent.append(True)
        os.killpg(os.getpgid(0), signal.SIGTERM)  # a preemption: every process of the job
    return _step(self, batch, batch_idx)

FlamingoModule.training_step = _signalled
"""


@pytest.fixture(scope="module")
def ddp_and_fsdp(tiny_world_dir, tmp_path_factory) -> dict:
    """On a world whose ranks have different numbers of validation batches: a 6-step DDP run, and the same on
    FSDP stopped by SIGTERM in step 3, then resumed in its folder and evaluated at the end (the model it
    evaluated recorded)."""
    import os
    import signal

    root = tmp_path_factory.mktemp("fsdp")
    world = _uneven_world(tiny_world_dir, root / "world")
    ddp = two_processes(_args(world, "ddp", "eval.at_end_of_training=false"), root / "ddp", 6)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    for name, code in (("cut", _SIGTERM_AT_STEP_3), ("record", _RECORD_EVALUATED)):
        (root / name).mkdir()
        (root / name / "sitecustomize.py").write_text(code)
    path = os.environ.get("PYTHONPATH", "")
    cut = two_processes(_args(world, "fsdp", "eval.at_end_of_training=false"), root / "fsdp", 6,
                        {"PYTHONPATH": os.pathsep.join([str(root / "cut"), path])})
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-4000:]
    interrupted = torch.load(root / "fsdp" / "checkpoints" / "interrupted.ckpt", map_location="cpu",
                             weights_only=False)
    resumed = two_processes(_args(world, "fsdp"), root / "fsdp", 6, {
        "PYTHONPATH": os.pathsep.join([str(root / "record"), path]), "EVALUATED_STATE": str(root / "evaluated.pt")})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"ddp": json.loads((root / "ddp" / "results.json").read_text()), "interrupted": interrupted,
            "fsdp": json.loads((root / "fsdp" / "results.json").read_text()), "fsdp_dir": root / "fsdp",
            "ddp_dir": root / "ddp", "evaluated": torch.load(root / "evaluated.pt", weights_only=True)}


def test_sharded_training_stopped_and_resumed_equals_data_parallel_training(ddp_and_fsdp):
    """Each rank holds a shard of every parameter, gradient and AdamW state; the update they make together is
    DDP's (same batches per rank, the gradient clipped by the norm over every shard). A preempted sharded run
    (SIGTERM to every process in step 3) stops after that step, the ranks write interrupted.ckpt together, and
    the run resumed from it goes on as the uninterrupted one."""
    ddp, fsdp, interrupted = ddp_and_fsdp["ddp"], ddp_and_fsdp["fsdp"], ddp_and_fsdp["interrupted"]
    assert interrupted["global_step"] == 3 and sorted(interrupted["FlamingoDataModule"]["positions_by_rank"]) == [0, 1]
    assert fsdp["status"] == "complete" and fsdp["strategy"] == "FSDP2Strategy" and ddp["strategy"] == "DDPStrategy"
    assert fsdp["world_size"] == ddp["world_size"] == 2
    assert [a["from_step"] for a in fsdp["attempts"]] == [0, 3]
    assert fsdp["loss"]["curve"]["step"] == ddp["loss"]["curve"]["step"] == [1, 2, 3, 4, 5, 6]
    assert fsdp["loss"]["curve"]["loss"] == pytest.approx(ddp["loss"]["curve"]["loss"], rel=1e-5)
    assert fsdp["loss"]["val"] == pytest.approx(ddp["loss"]["val"], rel=1e-5)
    assert fsdp["data"]["per_source"] == ddp["data"]["per_source"]
    # validation: rank 0 had 2 m3w batches and rank 1 one; the sharded run waited for ever at rank 0's second
    # (every forward gathers parameters). Every rank validates the one they both have, under DDP too
    assert fsdp["data"]["val"]["per_source"]["m3w"]["seen"] == ddp["data"]["val"]["per_source"]["m3w"]["seen"] == 4
    assert fsdp["gates"].keys() == ddp["gates"].keys()
    for name, value in ddp["gates"].items():  # the gates moved (about 0.01) and agree to float rounding
        assert abs(value) > 1e-3 and fsdp["gates"][name] == pytest.approx(value, abs=1e-6), name


def test_a_sharded_run_evaluates_its_trained_weights_whole_and_its_checkpoint_loads_unsharded(ddp_and_fsdp):
    """The evaluation at the end of training runs on rank 0 on an unsharded copy that every rank's shards fill
    (before: on rank 0's shards, which crashed): the copy holds the trained weights (those of last.ckpt, and
    DDP's to float rounding). last.ckpt holds every parameter whole (gathered on rank 0), so flamingo-eval loads
    it into an unsharded model and predicts what the run's evaluation predicted."""
    from flamingo_lab.eval.run import evaluate_checkpoint
    from flamingo_lab.training.module import FlamingoModule

    fsdp, run_dir, evaluated = ddp_and_fsdp["fsdp"], ddp_and_fsdp["fsdp_dir"], ddp_and_fsdp["evaluated"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ddp = torch.load(ddp_and_fsdp["ddp_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == ddp["global_step"] == 6
    whole = FlamingoModule(fsdp["config"]).state_dict()
    assert {k: tuple(v.shape) for k, v in state["state_dict"].items()} == {k: tuple(v.shape) for k, v in whole.items()}
    assert {f"model.{k}" for k in evaluated} == set(state["state_dict"])
    moved = 0
    for name, value in evaluated.items():
        assert torch.equal(value, state["state_dict"][f"model.{name}"]), name
        assert torch.allclose(value, ddp["state_dict"][f"model.{name}"], rtol=0, atol=1e-6), name
        moved += not torch.equal(value, whole[f"model.{name}"])  # trained, or loaded: not a fresh build's
    assert moved > 0
    evaluated_again = evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", fsdp["config"]["eval"],
                                          run_dir / "flamingo-eval", progress=False)

    def predictions(result):
        return {(t, k, e["id"]): e["prediction"] for t, per_k in result["scores"].items() for k, r in per_k.items()
                for e in r.get("examples", [])}

    assert predictions(fsdp["eval"]) and predictions(fsdp["eval"]) == predictions(evaluated_again["eval"])


def test_a_one_process_sharded_run_draws_its_eval_curve(tiny_world_dir, tmp_path):
    """The eval curve (on by default for the baseline row) evaluated the sharded model itself; FSDP2 stopped
    at step 0 ('FSDP requires running forward through the root module first'). It evaluates an unsharded copy."""
    import os
    import subprocess
    import sys

    args = [*_args(tiny_world_dir, "fsdp", "eval.at_end_of_training=false", "eval.curve.every_n_steps=2",
                   "eval.curve.max_items=2", "eval.curve.tasks=[vqav2]"),
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "flamingo-train"), *args], cwd=tmp_path, timeout=240,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["strategy"] == "FSDP2Strategy"
    assert [p["step"] for p in result["eval_curve"]] == [0, 2] and "vqav2" in result["eval_curve"][0]["scores"]
