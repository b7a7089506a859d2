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
    # layer0/attn -0.01010 against -0.01074), so the runs agree only if the shards' norms make the global norm
    return [f"trainer={trainer}", "scale=tiny", f"data.root={world}", "logger=none", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.gradient_clip_val=0.05", *extra]


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
    """A 6-step DDP run, and the same on FSDP stopped by SIGTERM in step 3, then resumed in its folder and
    evaluated at the end."""
    import os
    import signal

    root = tmp_path_factory.mktemp("fsdp")
    ddp = two_processes(_args(tiny_world_dir, "ddp", "eval.at_end_of_training=false"), root / "ddp", 6)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGTERM_AT_STEP_3)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cut = two_processes(_args(tiny_world_dir, "fsdp", "eval.at_end_of_training=false"), root / "fsdp", 6, env)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-4000:]
    interrupted = torch.load(root / "fsdp" / "checkpoints" / "interrupted.ckpt", map_location="cpu",
                             weights_only=False)
    resumed = two_processes(_args(tiny_world_dir, "fsdp"), root / "fsdp", 6)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"ddp": json.loads((root / "ddp" / "results.json").read_text()), "interrupted": interrupted,
            "fsdp": json.loads((root / "fsdp" / "results.json").read_text()), "fsdp_dir": root / "fsdp"}


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
    assert fsdp["gates"].keys() == ddp["gates"].keys()
    for name, value in ddp["gates"].items():  # the gates moved (about 0.01) and agree to float rounding
        assert abs(value) > 1e-3 and fsdp["gates"][name] == pytest.approx(value, abs=1e-6), name


def test_a_sharded_runs_checkpoint_is_whole_and_its_evaluation_is_the_unsharded_models(ddp_and_fsdp):
    """last.ckpt holds every parameter whole (gathered on rank 0), so it loads into an unsharded model; the
    evaluation at the end of training (rank 0, on an unsharded copy) scores as flamingo-eval does on it."""
    from flamingo_lab.eval.run import evaluate_checkpoint
    from flamingo_lab.training.module import FlamingoModule

    fsdp, run_dir = ddp_and_fsdp["fsdp"], ddp_and_fsdp["fsdp_dir"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    whole = FlamingoModule(fsdp["config"]).state_dict()
    assert {k: tuple(v.shape) for k, v in state["state_dict"].items()} == {k: tuple(v.shape) for k, v in whole.items()}
    evaluated = evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", fsdp["config"]["eval"],
                                    run_dir / "flamingo-eval", progress=False)
    scores = {t: {k: r["score"] for k, r in per_k.items()} for t, per_k in fsdp["eval"]["scores"].items()}
    assert scores and scores == {t: {k: r["score"] for k, r in per_k.items()}
                                 for t, per_k in evaluated["eval"]["scores"].items()}
