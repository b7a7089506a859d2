"""Paper-scale presets on the meta device: our parameter counts beside the paper's (Tables 3-5)."""

from __future__ import annotations

import pytest
import torch

from flamingo_lab.models.presets import PAPER_COUNTS, TABLE3_PARAMS
from flamingo_lab.params import count_parameters, main

TOL = 0.06  # the paper rounds to 0.1B and is not consistent to the last digit


@pytest.fixture(scope="module")
def counts_3b():
    return count_parameters(["scale=flamingo-3b"])


@pytest.mark.parametrize("component", ["vision", "resampler", "xattn", "lm", "total"])
def test_3b_components_match_the_paper(counts_3b, component):
    key = component if component == "total" else f"{component}/total"
    ratio = counts_3b[key] / PAPER_COUNTS["flamingo-3b"][component]
    assert abs(ratio - 1) < TOL, f"{component}: ours {counts_3b[key]:,} is {ratio:.1%} of the paper's"


def test_3b_preset_has_the_papers_shapes(counts_3b):
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    cfg = compose(["scale=flamingo-3b"])
    with torch.device("meta"):
        model = build_flamingo(cfg.model)
    assert next(model.parameters()).device.type == "meta"  # no memory, no weights
    assert cfg.model.vision.name == "nfnet_f6" and model.resampler.dim == 1536 and model.vision.dim == 3072
    assert len(model.xattn_layers) == 24 and model.xattn_layer_ids == list(range(24))
    assert model.resampler.n_layers == 6 and cfg.model.resampler.n_latents == 64
    assert model.parameter_counts()["trainable"] == counts_3b["trainable"]


@pytest.mark.parametrize("row", list(TABLE3_PARAMS))
def test_table3_param_column(row):
    overrides, paper = TABLE3_PARAMS[row]
    total = count_parameters(["scale=flamingo-3b", *overrides])["total"]
    assert abs(total / paper - 1) < TOL, f"{row}: ours {total / 1e9:.2f}B vs paper {paper / 1e9:.1f}B"


def test_matched_resampler_budgets_at_3b():
    per = {r: count_parameters(["scale=flamingo-3b", f"model/resampler={r}"])["resampler/total"]
           for r in ["perceiver", "mlp", "transformer"]}
    for r in ["mlp", "transformer"]:
        assert abs(per[r] / per["perceiver"] - 1) < 0.03, per


@pytest.mark.parametrize("scale, blocks", [("flamingo-9b", 10), ("flamingo-80b", 12)])
def test_larger_presets_build_on_meta(scale, blocks):
    """The paper's 9B/80B counts do not follow its 3B formulas (models/presets.py): the shared parts
    match to 6%; the totals only to 16% (9B: our 40-layer LM is 8.3B vs its 7.1B) and 8% (80B)."""
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    with torch.device("meta"):
        model = build_flamingo(compose([f"scale={scale}"]).model)
    counts, paper = model.parameter_counts(), PAPER_COUNTS[scale]
    assert len(model.xattn_layers) == blocks
    for part in ["vision", "resampler"]:
        assert abs(counts[f"{part}/total"] / paper[part] - 1) < TOL
    assert abs(counts["total"] / paper["total"] - 1) < (0.16 if scale == "flamingo-9b" else 0.08)


def test_flamingo_params_prints_a_table(capsys):
    main(["scale=flamingo-3b"])
    out = capsys.readouterr().out
    for label in ["vision", "resampler", "cross-attention", "LM", "new embeddings", "total"]:
        assert label in out
    assert "435.3M" in out and "3.13B" in out


def test_paper_presets_build_on_meta_by_themselves(tiny_tokenizer_dir):
    """scale=flamingo-* sets model.init_device=meta: composing and building never allocates 3B weights."""
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    cfg = compose(["scale=flamingo-80b", f"model.lm.tokenizer={tiny_tokenizer_dir}"])
    model = build_flamingo(cfg.model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.lm.config.vocab_size == 32000  # the preset's vocabulary holds the tokenizer's


@pytest.mark.parametrize("scale", ["flamingo-3b", "flamingo-9b", "flamingo-80b"])
def test_the_paper_scales_train_with_the_papers_recipe_and_the_embedded_scale_with_its_own(scale):
    """The presets trained with the embedded scale's recipe (lr 2e-3, 20 warm-up steps, gate lr x20, 64-token
    windows), which serves a 400-step CPU budget: at 3B that is 20x the paper's lr, and nothing said so."""
    from flamingo_lab.config import compose

    cfg = compose([f"scale={scale}", "experiment=baseline"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.gate_lr_mult) == (1e-4, 5000, 1)
    assert (cfg.data.seq_len, cfg.data.max_images, cfg.optim.weight_decay) == (256, 5, 0.1)
    assert cfg.trainer.gradient_clip_val == 1.0
    embedded = compose(["scale=embedded", "experiment=baseline"])
    assert (embedded.optim.lr, embedded.optim.gate_lr_mult, embedded.data.seq_len) == (2e-3, 20, 64)
