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
