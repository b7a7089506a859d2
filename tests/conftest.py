"""Shared test set-up: offline everything, tiny artefacts made locally."""

from __future__ import annotations

import os

# Nothing downloads in tests: no model hub, no W&B server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test models are tiny: one thread avoids thread overhead and contention (2-core CI, subprocess runs).
torch.set_num_threads(1)

TINY_CORPUS = [
    "a red circle.",
    "two blue squares left of a green triangle!",
    "the small yellow star is above the big purple circle.",
    "question: what colour is the circle? answer: red",
    "output: one green square and three red triangles.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer folder with <image> and <|endofchunk|>, trained on a few sentences."""
    from flamingo_lab.data.tokenizer import train_word_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_word_tokenizer(TINY_CORPUS, out)
    return out


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory):
    """The tiny embedded world (conf/world/tiny.yaml), written once per session; returns its folder.

    Read it with ``flamingo_lab.data.shards.load_world(path)`` (shards per split and source) and
    ``load_world_tokenizer(path)``.
    """
    from flamingo_lab.data.world import write_world
    from flamingo_lab.make_data import compose_world

    out = tmp_path_factory.mktemp("tiny_world")
    write_world(compose_world("tiny"), out, progress=False)
    return out


def two_processes(args: list[str], run_dir, steps: int, env: dict | None = None, *extra: str):
    """``flamingo-train`` on 2 CPU processes (gloo) with ``args`` (choose ``trainer=ddp`` or ``trainer=fsdp``), in
    ``run_dir``, for ``steps`` steps; the finished process (killed with every rank it launched after 240 s, and
    the test failed: a hang)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    run_dir = Path(run_dir)
    args = [*args, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}", *extra]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "flamingo-train"), *args], cwd=run_dir.parent,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank: the ranks it launched are in its session
        out, err = proc.communicate()
        pytest.fail(f"the 2-process run hung (killed after 240 s): {err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
