"""Each Table 3 row is the paper's ablation and nothing else: its composed config, diffed against the
baseline's, at the scales the study runs (embedded, and the CI's tiny/smoke) and at the paper's (flamingo-3b).
Compose only, no training: every test here is well under a few seconds."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from flamingo_lab.analysis.paper import PAPER_REFERENCES, PAPER_TABLE3, ROW_ORDER, TASKS
from flamingo_lab.config import CONF_DIR, compose
from flamingo_lab.data.mixture import loss_scale, source_specs

SCALES = ["tiny", "embedded", "flamingo-3b"]

#: What only the baseline row evaluates more of (its close-up: the text control and the accuracy curve; at the
#: embedded scale the changed rows skip the 0-shot pass). Evaluation only: the 4-shot headline is the same.
BASELINE_EVAL = {"eval.controls", "eval.curve.every_n_steps", "eval.shots"}

#: Per row, every config value that differs from the baseline's outside data.sources (checked per source
#: below), the row's name and the baseline's extra evaluation: exactly these, at every scale.
ROW_DIFF = {
    "baseline": {},
    "no_video": {},
    "no_image_text": {},
    "laion": {},
    "no_m3w": {},
    "round_robin": {"data.optimisation": "round_robin"},
    "no_tanh": {"model.xattn.gating": "none"},
    "vanilla_xattn": {"model.xattn.name": "vanilla", "model.xattn.gating": "none"},  # vanilla has no gate
    "grafting": {"model.xattn.name": "grafting"},
    "xattn_middle": {"model.xattn.every": "middle"},
    "xattn_every4": {"model.xattn.every": 4},
    "xattn_every2": {"model.xattn.every": 2},
    "resampler_mlp": {"model.resampler.name": "mlp"},
    "resampler_transformer": {"model.resampler.name": "transformer"},
    "vision_clip": {"model.vision.name": "clip_vit_l14"},
    "vision_nfnet_f0": {"model.vision.name": "nfnet_f0"},
    "lm_from_scratch": {"model.lm.freeze": "train_from_scratch"},
    "lm_finetuned": {"model.lm.freeze": "train_pretrained"},
    "attend_all_previous": {"model.xattn.attend": "all_previous"},
}

#: Per data row, the baseline's sources it drops (the others keep their weight, batch and shapes).
DROPPED = {"no_video": {"vtp"}, "no_image_text": {"ltip", "align"}, "laion": {"ltip", "align"}, "no_m3w": {"m3w"}}


def _flat(node, prefix="") -> dict:
    out = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = node
    return out


_CACHE: dict = {}


def _compose(row: str, scale: str):
    if (row, scale) not in _CACHE:
        _CACHE[row, scale] = compose([f"experiment={row}", f"scale={scale}"])
    return _CACHE[row, scale]


def _diff(row: str, scale: str) -> dict:
    base = _flat(OmegaConf.to_container(_compose("baseline", scale), resolve=True))
    ours = _flat(OmegaConf.to_container(_compose(row, scale), resolve=True))
    skip = {"experiment", "run_name", *BASELINE_EVAL}
    return {k: ours.get(k, "<absent>") for k in set(base) | set(ours)
            if base.get(k, "<absent>") != ours.get(k, "<absent>") and k not in skip
            and not k.startswith("data.sources.")}


def test_the_rows_are_the_papers_and_the_sweeps():
    spec = OmegaConf.load(CONF_DIR.parent / "sweeps" / "table3.yaml")
    assert list(spec.rows) == ROW_ORDER == list(ROW_DIFF)
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")) == sorted(ROW_ORDER)


@pytest.mark.parametrize("row", ROW_ORDER)
def test_every_row_names_itself(row):
    """results.json, the run folder (<out>/${experiment}/seed<k>) and the table key on this name."""
    assert _compose(row, "embedded").experiment == row


@pytest.mark.parametrize("scale", SCALES)
def test_the_baseline_is_flamingo_3b_in_kind(scale):
    cfg = _compose("baseline", scale)
    m = cfg.model
    assert (m.vision.name, m.resampler.name, m.xattn.name, m.xattn.gating, m.xattn.every, m.xattn.attend,
            m.lm.freeze) == ("nfnet_f6", "perceiver", "gated", "tanh", 1, "immediate", "frozen")
    assert cfg.data.optimisation == "accumulate"
    specs = source_specs(cfg.data)
    # the embedded scale's video pairs: weight 0.2 at M3W's batch (README, video direction); the paper's elsewhere
    video = (0.2, 1.0) if scale == "embedded" else (0.03, 0.25)
    assert {s: v["weight"] for s, v in specs.items()} == {"m3w": 1.0, "ltip": 0.2, "align": 0.2, "vtp": video[0]}
    assert specs["vtp"]["batch_size"] == max(1, round(specs["m3w"]["batch_size"] * video[1]))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("row", ROW_ORDER)
def test_row_differs_from_the_baseline_by_its_ablation_only(row, scale):
    """Outside the sources, exactly the row's change (no size, optimiser, trainer or evaluation setting)."""
    assert _diff(row, scale) == ROW_DIFF[row], (row, scale)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("row", [r for r in ROW_ORDER if r not in DROPPED])
def test_non_data_rows_train_on_the_baselines_mixture(row, scale):
    assert source_specs(_compose(row, scale).data) == source_specs(_compose("baseline", scale).data)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("row", list(DROPPED))
def test_data_rows_drop_their_sources_and_keep_the_rest(row, scale):
    """Paper: the remaining datasets keep their weights (and here their batch sizes and shapes); the update's
    loss is their weighted sum over the sum of their weights, so their weights relative to each other stay."""
    base, ours = source_specs(_compose("baseline", scale).data), source_specs(_compose(row, scale).data)
    kept = {s: v for s, v in base.items() if s not in DROPPED[row]}
    assert {s: v for s, v in ours.items() if s != "laion"} == kept
    assert set(ours) == set(kept) | ({"laion"} if row == "laion" else set())
    b_scale, o_scale = loss_scale(_compose("baseline", scale).data), loss_scale(_compose(row, scale).data)
    ref = next(iter(kept))
    for s in kept:
        assert o_scale[s] / o_scale[ref] == pytest.approx(b_scale[s] / b_scale[ref]), (row, s)


@pytest.mark.parametrize("scale", SCALES)
def test_laion_replaces_the_image_text_pairs_batch_for_batch(scale):
    """Image-Text pairs -> LAION: one source in place of ALIGN + LTIP, reading as many pairs a step as the two
    (paper: the same step time, 1.74 s), in the pairs' shape. Before, its batch was twice theirs (batch_ratio
    4.0 left from when ltip and align had 2.0 each: 64 pairs a step against the baseline's 32 at embedded)."""
    base, ours = source_specs(_compose("baseline", scale).data), source_specs(_compose("laion", scale).data)
    laion = ours["laion"]
    assert laion["batch_size"] == base["ltip"]["batch_size"] + base["align"]["batch_size"]
    assert {k: v for k, v in laion.items() if k not in ("batch_size", "weight")} == \
        {k: v for k, v in base["ltip"].items() if k not in ("batch_size", "weight")}
    assert laion["weight"] == base["ltip"]["weight"] == base["align"]["weight"]  # the paper gives no weight


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("row", ROW_ORDER)
def test_every_row_is_scored_the_same_way(row, scale):
    """The headline (Overall at overall_shots over the five DEV tasks) is evaluated for every row, on the same
    tasks, items and references; only the baseline adds its close-up (0 shots, the text control, the curve)."""
    ev = _compose(row, scale).eval
    assert ev.overall_shots in list(ev.shots)
    assert list(ev.overall_tasks) == TASKS and dict(ev.paper_references) == PAPER_REFERENCES
    if row != "baseline":
        assert list(ev.controls) == [] and ev.curve.every_n_steps is None


def test_each_vision_row_pretrains_its_own_encoder_and_the_lm_rows_their_lm(monkeypatch):
    """Each vision row gets its own pretraining stage (the stage key holds the encoder's config); the fine-tuned
    row starts from the baseline's pretrained LM (same stage) and unfreezes it; the random-init row has none."""
    from pathlib import Path

    from flamingo_lab.pretrain import stages

    keys = []
    monkeypatch.setattr(stages, "ensure_stage",
                        lambda stage, key, *a, **k: (keys.append((stage, key)), (Path(f"/stage{len(keys)}"), {}, False))[1])

    def stage_keys(row):
        cfg = _compose(row, "embedded").copy()
        keys.clear()
        stages._lm_stage(cfg, {}, False)
        stages._vision_stage(cfg, {}, False)
        return dict(keys), cfg

    base, base_cfg = stage_keys("baseline")
    vision = {row: stage_keys(row)[0]["vision"] for row in ("baseline", "vision_clip", "vision_nfnet_f0")}
    assert len({repr(v) for v in vision.values()}) == 3
    for row, key in vision.items():
        assert key["settings"] == base["vision"]["settings"]
        assert {k: v for k, v in key["vision"].items() if k != "name"} == \
            {k: v for k, v in base["vision"]["vision"].items() if k != "name"}
    finetuned, ft_cfg = stage_keys("lm_finetuned")
    assert finetuned["lm"] == base["lm"] and ft_cfg.model.lm.freeze == "train_pretrained"
    scratch, sc_cfg = stage_keys("lm_from_scratch")
    assert "lm" not in scratch and sc_cfg.model.lm.path is None and sc_cfg.model.lm.freeze == "train_from_scratch"
    assert scratch["vision"] == base["vision"]


def test_the_param_column_counts_the_rows_the_study_runs():
    """flamingo-params --table3 composes each row from its experiment file, and quotes the paper's column."""
    from flamingo_lab.models.presets import B, TABLE3_PARAMS

    rows = {}
    for label, (overrides, paper) in TABLE3_PARAMS.items():
        assert len(overrides) == 1 and overrides[0].startswith("experiment="), (label, overrides)
        row = overrides[0].split("=", 1)[1]
        rows[row] = label
        printed = PAPER_TABLE3[row]["params"] or PAPER_TABLE3["baseline"]["params"]  # Table 10: masking adds none
        assert paper == pytest.approx(printed * B), label
    # every row that changes the model's shape is in the column
    shaped = {"vanilla_xattn", "grafting", "xattn_middle", "xattn_every4", "xattn_every2", "resampler_mlp",
              "resampler_transformer", "vision_clip", "vision_nfnet_f0"}
    assert shaped <= set(rows) and "baseline" in rows


def test_paper_numbers_are_the_papers():
    """Table 3 as printed (params B, step time s, COCO, OKVQA, VQAv2, MSVDQA, VATEX, Overall), in its order;
    Table 10's extra row gives only its Overall."""
    paper = {
        "baseline": (3.2, 1.74, 86.5, 42.1, 55.8, 36.3, 53.4, 70.7),
        "no_video": (3.2, 1.42, 84.2, 43.0, 53.9, 34.5, 46.0, 67.3),
        "no_image_text": (3.2, 0.95, 66.3, 39.2, 51.6, 32.0, 41.6, 60.9),
        "laion": (3.2, 1.74, 79.5, 41.4, 53.5, 33.9, 47.6, 66.4),
        "no_m3w": (3.2, 1.02, 54.1, 36.5, 52.7, 31.4, 23.5, 53.4),
        "round_robin": (3.2, 1.68, 76.1, 39.8, 52.1, 33.2, 40.8, 62.9),
        "no_tanh": (3.2, 1.74, 78.4, 40.5, 52.9, 35.9, 47.5, 66.5),
        "vanilla_xattn": (2.4, 1.16, 80.6, 41.5, 53.4, 32.9, 50.7, 66.9),
        "grafting": (3.3, 1.74, 79.2, 36.1, 50.8, 32.2, 47.8, 63.1),
        "xattn_middle": (2.0, 0.87, 71.5, 38.1, 50.2, 29.1, 42.3, 59.8),
        "xattn_every4": (2.3, 1.02, 82.3, 42.7, 55.1, 34.6, 50.8, 68.8),
        "xattn_every2": (2.6, 1.24, 83.7, 41.0, 55.8, 34.5, 49.7, 68.2),
        "resampler_mlp": (3.2, 1.85, 78.6, 42.2, 54.7, 35.2, 44.7, 66.6),
        "resampler_transformer": (3.2, 1.81, 83.2, 41.7, 55.6, 31.5, 48.3, 66.7),
        "vision_clip": (3.1, 1.58, 76.5, 41.6, 53.4, 33.2, 44.5, 64.9),
        "vision_nfnet_f0": (2.9, 1.45, 73.8, 40.5, 52.8, 31.1, 42.9, 62.7),
        "lm_from_scratch": (3.2, 2.42, 74.8, 31.5, 45.6, 26.9, 50.1, 57.8),
        "lm_finetuned": (3.2, 2.42, 81.2, 33.7, 47.4, 31.0, 53.9, 62.7),
        "attend_all_previous": (None, None, None, None, None, None, None, 63.5),
    }
    assert ROW_ORDER == list(paper)
    for row, numbers in paper.items():
        p = PAPER_TABLE3[row]
        assert (p["params"], p["step_time"], *(p[t] for t in TASKS), p["overall"]) == numbers, row
    assert PAPER_REFERENCES == {"coco": 143.3, "okvqa": 54.4, "vqav2": 80.2, "msvdqa": 47.9, "vatex": 76.3}
    for row in ROW_ORDER[:-1]:  # the paper's Overall is the mean over the references, to its rounding
        p = PAPER_TABLE3[row]
        mean = 100 * sum(p[t] / PAPER_REFERENCES[t] for t in TASKS) / len(TASKS)
        assert abs(mean - p["overall"]) <= 0.25, (row, mean)
    changed = {row: PAPER_TABLE3[row]["changed_to"] for row in ROW_ORDER}
    assert changed["laion"] == "Image-Text pairs → LAION" and changed["xattn_middle"] == "single in middle"
    assert changed["lm_from_scratch"] == "trained from random init" and changed["lm_finetuned"] == "fine-tuned pretrained"


def test_an_unknown_row_names_the_valid_ones():
    from flamingo_lab.sweep import load_sweep

    with pytest.raises(ValueError) as info:
        load_sweep(CONF_DIR.parent / "sweeps" / "table3.yaml", ["rows=[baseline,no_vid]"])
    message = str(info.value)
    assert "no_vid" in message and all(row in message for row in ROW_ORDER)
