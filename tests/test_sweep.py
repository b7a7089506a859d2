"""The Table 3 study: experiment configs (one per row), the sweep file and command, skip/failure
semantics of a run, and (slow) the smoke sweep of every row end to end with the notebook on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flamingo_lab.analysis import PAPER_TABLE3, ROW_ORDER
from flamingo_lab.config import CONF_DIR, ablation_choices, compose
from flamingo_lab.sweep import Sequential, experiments, load_sweep, multiruns, runs_of, seeds_of, train_command
from flamingo_lab.training import run as run_mod

BIN = Path(sys.executable).parent
REPO = CONF_DIR.parent
SWEEP = REPO / "sweeps" / "table3.yaml"

#: What each row may change relative to the baseline (prefixes of config keys), and its ablation choices.
ROW_CHANGES = {
    "baseline": ([], {}),
    "no_video": (["data.sources"], {}),
    "no_image_text": (["data.sources"], {}),
    "laion": (["data.sources"], {}),
    "no_m3w": (["data.sources"], {}),
    "round_robin": (["data.optimisation"], {}),
    "no_tanh": (["model.xattn.gating"], {"gating": "none"}),
    "vanilla_xattn": (["model.xattn"], {"xattn": "vanilla", "gating": "none"}),
    "grafting": (["model.xattn"], {"xattn": "grafting"}),
    "xattn_middle": (["model.xattn.every"], {"xattn_every": "middle"}),
    "xattn_every4": (["model.xattn.every"], {"xattn_every": "4"}),
    "xattn_every2": (["model.xattn.every"], {"xattn_every": "2"}),
    "resampler_mlp": (["model.resampler"], {"resampler": "mlp"}),
    "resampler_transformer": (["model.resampler"], {"resampler": "transformer"}),
    "vision_clip": (["model.vision"], {"vision": "clip_vit_l14"}),
    "vision_nfnet_f0": (["model.vision"], {"vision": "nfnet_f0"}),
    "lm_from_scratch": (["model.lm.freeze"], {"lm_freeze": "train_from_scratch"}),
    "lm_finetuned": (["model.lm.freeze"], {"lm_freeze": "train_pretrained"}),
    "attend_all_previous": (["model.xattn.attend"], {"attend": "all_previous"}),
}
#: Which sources each data row trains on.
ROW_SOURCES = {
    "no_video": {"m3w", "ltip", "align"}, "no_image_text": {"m3w", "vtp"},
    "laion": {"m3w", "laion", "vtp"}, "no_m3w": {"ltip", "align", "vtp"},
}


def _flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _sources(cfg) -> set[str]:
    return {k for k, v in cfg.data.sources.items() if v is not None}


def test_every_paper_row_has_an_experiment_and_the_sweep_runs_them_all():
    assert set(ROW_CHANGES) == set(PAPER_TABLE3) and len(ROW_CHANGES) == 19
    assert experiments() == sorted(PAPER_TABLE3)
    spec = load_sweep(SWEEP)
    assert list(spec.rows) == ROW_ORDER  # the paper's order
    assert seeds_of(spec) == [0, 1, 2] and spec.scale == "embedded" and spec.launcher == "local"
    for row in ROW_ORDER:  # two or three lines of difference (+ the @package header and a comment)
        lines = [ln for ln in (CONF_DIR / "experiment" / f"{row}.yaml").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        assert 2 <= len(lines) <= 3, (row, lines)


@pytest.fixture(scope="module")
def baseline():
    return compose(["experiment=baseline", "scale=tiny"])


#: What the baseline row alone evaluates more of (its close-up: the text control, the curve; at the embedded
#: scale the other rows evaluate at 4 shots only). Evaluation only: training is the same.
BASELINE_EVAL = {"eval.controls", "eval.curve.every_n_steps", "eval.shots"}


def _training_part(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k not in BASELINE_EVAL}


def test_baseline_is_the_papers_and_the_default_run_is_unchanged(baseline):
    assert baseline.experiment == "baseline" and baseline.model.vision.name == "nfnet_f6"
    assert baseline.model.vision.size == "small"  # the scale still sets the size
    default = compose(["scale=tiny"])
    assert default.experiment is None and default.model.vision.name == "tiny"
    assert _training_part(_flat(compose(["experiment=baseline", "scale=tiny", "model/vision=tiny"]))) == {
        **_training_part(_flat(default)), "experiment": "baseline"}  # baseline = defaults + NFNet-F6, nothing else
    assert list(baseline.eval.controls) == ["text"] and list(default.eval.controls) == []
    embedded = {row: compose([f"experiment={row}", "scale=embedded"]).eval for row in ("baseline", "no_m3w")}
    assert embedded["baseline"].curve.every_n_steps == 50 and list(embedded["baseline"].shots) == [0, 4]
    assert embedded["no_m3w"].curve.every_n_steps is None and list(embedded["no_m3w"].shots) == [4]
    assert list(compose(["scale=embedded"]).eval.shots) == [0, 4]  # a run of no row: both


@pytest.mark.parametrize("row", ROW_ORDER)
def test_experiment_differs_from_the_baseline_only_in_its_row(row, baseline):
    cfg = compose([f"experiment={row}", "scale=tiny"])
    assert cfg.experiment == row
    prefixes, choices = ROW_CHANGES[row]
    base, ours = _flat(baseline), _flat(cfg)
    changed = {k for k in set(base) | set(ours) if base.get(k) != ours.get(k)} - {"experiment", "run_name"} - BASELINE_EVAL
    assert all(any(k.startswith(p) for p in prefixes) for k in changed), (row, sorted(changed))
    assert bool(changed) == (row != "baseline"), row
    base_choices, our_choices = ablation_choices(baseline), ablation_choices(cfg)
    assert {k: v for k, v in our_choices.items() if base_choices.get(k) != v} == choices
    if row in ROW_SOURCES:
        assert _sources(cfg) == ROW_SOURCES[row]


def test_experiment_applies_after_the_scale():
    """A row's values win over a scale's (flamingo-3b sets xattn.every=1 and NFNet-F6)."""
    cfg = compose(["experiment=xattn_every4", "scale=flamingo-3b"])
    assert cfg.model.xattn.every == 4 and cfg.model.vision.name == "nfnet_f6" and cfg.model.vision.size == "full"
    assert compose(["experiment=vision_clip", "scale=flamingo-3b"]).model.vision.name == "clip_vit_l14"
    assert compose(["experiment=vision_nfnet_f0", "scale=embedded"]).model.vision.size == "small"


def test_smoke_scale_is_ci_sized():
    cfg = compose(["experiment=baseline", "scale=smoke"])
    assert cfg.data.root == "data/tiny" and cfg.trainer.max_steps <= 10
    assert list(cfg.eval.shots) == [0, 4] and cfg.eval.max_items <= 4
    assert not cfg.pretrain.lm.enabled and not cfg.pretrain.vision.enabled


def test_sweep_command_is_one_multirun_with_a_fixed_folder():
    spec = load_sweep(SWEEP, ["scale=smoke", "seeds=2", "rows=[baseline,no_m3w]", "force=true",
                              "trainer.max_steps=3", "hydra.launcher.n_jobs=2"])
    cmd = train_command(spec)
    assert cmd[0].endswith("flamingo-train") and cmd[1] == "-m"
    for arg in ["seed=0,1", "experiment=baseline,no_m3w", "scale=smoke", "hydra/launcher=local",
                "hydra.sweep.dir=multirun/table3-smoke", "hydra.sweep.subdir=${experiment}/seed${seed}",
                "logger.group=table3-smoke", "force=true", "trainer.max_steps=3", "hydra.launcher.n_jobs=2"]:
        assert arg in cmd, (arg, cmd)
    assert cmd.index("seed=0,1") < cmd.index("experiment=baseline,no_m3w")  # seeds outermost
    assert cmd.index("hydra.launcher.n_jobs=2") > cmd.index("force=true")  # the sweep's jobs, then overrides win
    assert "hydra.launcher.n_jobs=1" in train_command(load_sweep(SWEEP, ["jobs=1"]))
    assert not any("n_jobs" in c for c in train_command(load_sweep(SWEEP, ["launcher=slurm"])))
    assert load_sweep(SWEEP, ["out=/x/y", "seeds=[3,5]"]).out == "/x/y"
    assert seeds_of(load_sweep(SWEEP, ["seeds=[3,5]"])) == [3, 5]
    with pytest.raises(ValueError, match="no_such_row"):
        load_sweep(SWEEP, ["rows=[baseline,no_such_row]"])


def test_row_seeds_give_the_embedded_baseline_five_seeds_in_a_second_multirun():
    """The baseline is in every comparison, so the embedded study runs it with 5 seeds: the other rows' 3 seeds
    as one multirun, then the baseline's seeds 3 and 4. Other scales, and a sweep given `seeds=`, run
    `seeds` for every row."""
    spec = load_sweep(SWEEP)
    assert seeds_of(spec, "baseline") == [0, 1, 2, 3, 4] and seeds_of(spec, "no_m3w") == [0, 1, 2]
    assert multiruns(spec) == [([0, 1, 2], ROW_ORDER), ([3, 4], ["baseline"])]
    runs = runs_of(spec)
    assert len(runs) == 19 * 3 + 2 and runs[-2:] == [("baseline", 3), ("baseline", 4)]
    second = train_command(spec, *multiruns(spec)[1])
    assert "seed=3,4" in second and "experiment=baseline" in second
    assert second[4:] == train_command(spec)[4:]  # the same settings for every run
    for args in (["scale=smoke"], ["seeds=2"], ["row_seeds={}"]):
        one = load_sweep(SWEEP, args)
        assert len(multiruns(one)) == 1 and seeds_of(one, "baseline") == seeds_of(one), args
    mine = load_sweep(SWEEP, ["seeds=1", "rows=[baseline,no_m3w,no_tanh]",
                              "row_seeds={embedded: {no_m3w: 2, no_tanh: [0, 5]}}"])
    assert multiruns(mine) == [([0], ["baseline", "no_m3w", "no_tanh"]), ([1], ["no_m3w"]), ([5], ["no_tanh"])]
    with pytest.raises(ValueError, match=r"row_seeds.embedded names rows \['nope'\].*valid rows: attend_all_previous"):
        load_sweep(SWEEP, ["row_seeds.embedded.nope=2"])
    with pytest.raises(ValueError, match="row_seeds.embedded.baseline must give at least one seed"):
        load_sweep(SWEEP, ["row_seeds.embedded.baseline=0"])
    with pytest.raises(ValueError, match="seeds must give at least one seed, each once"):
        load_sweep(SWEEP, ["seeds=[1,1]"])


def test_multiruns_run_one_after_the_other_and_report_the_first_failure(tmp_path):
    log = tmp_path / "order.txt"

    def step(name, code):
        return [sys.executable, "-c", f"open({str(log)!r}, 'a').write({name!r}); raise SystemExit({code})"]

    proc = Sequential([step("a", 0), step("b", 3), step("c", 0)], dict(os.environ))
    assert proc.wait(timeout=60) == 3 and proc.returncode == 3
    assert log.read_text() == "abc"  # a failed multirun does not stop the next (its runs are recorded)
    slow = Sequential([[sys.executable, "-c", "import time; time.sleep(2)"], step("d", 0)], dict(os.environ))
    with pytest.raises(subprocess.TimeoutExpired):
        slow.wait(timeout=0.05)
    slow.stop()  # the sweep interrupted: the running multirun ends, no further one starts
    assert slow.wait(timeout=60) == 130 and log.read_text() == "abc"
    stopped = Sequential([step("e", 143), step("f", 0)], dict(os.environ))  # a run stopped by SIGTERM
    assert stopped.wait(timeout=60) == 143 and log.read_text() == "abce"  # before: f started after it


def test_the_sweep_command_starts_every_multirun(tmp_path, monkeypatch, capsys):
    import flamingo_lab.sweep as sweep_mod

    started = []

    class Recorder:
        returncode = 0

        def __init__(self, commands, env):
            started.extend(commands)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(sweep_mod, "Sequential", Recorder)
    monkeypatch.setattr(sweep_mod, "ensure_world", lambda spec, env: None)
    assert sweep_mod.main([str(SWEEP), f"out={tmp_path}", "render=false", "rows=[baseline,no_m3w]"]) == 1
    assert [(c[2], c[3]) for c in started] == [("seed=0,1,2", "experiment=baseline,no_m3w"),
                                               ("seed=3,4", "experiment=baseline")]
    out = capsys.readouterr().out
    assert "2 rows x 3 seeds (baseline: 5) = 8 runs" in out and "0/8 complete, 0 failed, 8 missing" in out

    stopped = []
    Recorder.stop = lambda self: stopped.append(True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "report_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.main([str(SWEEP), f"out={tmp_path}", "render=false", "rows=[baseline]"])
    assert stopped == [True]  # Ctrl-C: the multiruns not yet started never start


@pytest.mark.parametrize("launcher", ["local", "slurm", "slurm_cpu"])
def test_launcher_configs_compose(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", [f"hydra/launcher={launcher}", "experiment=baseline"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    if launcher == "local":
        assert target.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 1
    else:
        assert target.endswith("SlurmLauncher") and cfg.hydra.launcher.array_parallelism > 0


def test_wandb_tags_name_the_experiment(tmp_path):
    logger = run_mod.make_logger(compose(["experiment=no_tanh", "scale=tiny"]), tmp_path)
    tags = logger._wandb_init["tags"]
    assert "experiment=no_tanh" in tags and "gating=none" in tags and "vision=nfnet_f6" in tags


# --- skip and failure semantics of one run (training.run.run), without training ---------------------

@pytest.fixture
def small_cfg():
    return compose(["experiment=no_tanh", "scale=tiny"])  # train() is replaced: nothing is logged


def test_complete_results_for_the_same_config_are_skipped(small_cfg, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_mod, "train", lambda cfg, run_dir: calls.append(1) or {"status": "complete", "new": True})
    key = run_mod.config_key(small_cfg)
    (tmp_path / "results.json").write_text(json.dumps({"status": "complete", "config_key": key, "old": True}))
    assert run_mod.run(small_cfg, tmp_path)["old"] and not calls
    small_cfg.logger.group = "another-sweep"  # logging settings do not change what is computed
    assert run_mod.config_key(small_cfg) == key
    small_cfg.force = True
    assert run_mod.run(small_cfg, tmp_path)["new"] and len(calls) == 1
    small_cfg.force, small_cfg.trainer.max_steps = False, 7  # another config: trained again
    assert run_mod.run(small_cfg, tmp_path)["new"] and len(calls) == 2
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "config_key": run_mod.config_key(small_cfg)}))
    assert run_mod.run(small_cfg, tmp_path)["new"] and len(calls) == 3  # a failed run is retried


def test_a_setting_added_later_keeps_older_runs_keys(small_cfg):
    """A run made before model.resampler.spatial_emb existed computed what spatial_emb=false computes: its
    results.json still counts; spatial_emb=true is another config."""
    from omegaconf import OmegaConf

    key = run_mod.config_key(small_cfg)
    before = OmegaConf.to_container(small_cfg)
    del before["model"]["resampler"]["spatial_emb"]  # the config as composed before the setting existed
    assert run_mod.config_key(OmegaConf.create(before)) == key
    small_cfg.model.resampler.spatial_emb = True
    assert run_mod.config_key(small_cfg) != key


def _write_manifest(root: Path, **manifest) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "world.json").write_text(json.dumps(manifest))


def test_a_world_rewritten_with_other_settings_trains_its_runs_again(small_cfg, tmp_path):
    """The train config names its data only by folder: the config key holds the world's fingerprint, so runs
    made on a world that flamingo-data has since rewritten with other settings do not count as done."""
    from dataclasses import asdict

    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import compose_world

    small_cfg.data.root = str(tmp_path / "world")
    nothing = run_mod.config_key(small_cfg)  # no world yet: a key all the same
    world = asdict(compose_world("tiny"))
    _write_manifest(tmp_path / "world", format=WORLD_FORMAT, config=world, elapsed_s=1.0)
    key = run_mod.config_key(small_cfg)
    assert key != nothing
    _write_manifest(tmp_path / "world", format=WORLD_FORMAT, config=world, elapsed_s=2.0)  # the same world again
    assert run_mod.config_key(small_cfg) == key
    older = {k: v for k, v in world.items() if k != "vtp_moves"}  # written before the setting existed
    _write_manifest(tmp_path / "world", format=WORLD_FORMAT, config=older)
    assert world["vtp_moves"] == 0.25 and run_mod.config_key(small_cfg) == key
    other = {"row_first": "column_first", "column_first": "row_first"}[world["position_words"]]
    _write_manifest(tmp_path / "world", format=WORLD_FORMAT, config={**world, "position_words": other})
    assert run_mod.config_key(small_cfg) != key

    tasks = {"coco": {"kind": "caption", "splits": {"test": ["coco-test-000000.tar"]}, "counts": {"test": 5}}}
    _write_manifest(tmp_path / "world", format="flamingo-lab-tasks/1", tasks=tasks, elapsed_s=1.0)  # imported
    imported = run_mod.config_key(small_cfg)
    _write_manifest(tmp_path / "world", format="flamingo-lab-tasks/1", tasks=tasks, elapsed_s=9.0)
    assert run_mod.config_key(small_cfg) == imported
    tasks["coco"]["counts"]["test"] = 6
    _write_manifest(tmp_path / "world", format="flamingo-lab-tasks/1", tasks=tasks)
    assert run_mod.config_key(small_cfg) != imported
    # a hand-written manifest of real training shards: another shard list is other data
    _write_manifest(tmp_path / "world", shards={"train": {"m3w": ["a.tar"]}, "val": {"m3w": ["v.tar"]}})
    real = run_mod.config_key(small_cfg)
    _write_manifest(tmp_path / "world", shards={"train": {"m3w": ["a.tar", "b.tar"]}, "val": {"m3w": ["v.tar"]}})
    assert run_mod.config_key(small_cfg) != real


def test_the_sweep_refuses_a_world_written_with_other_settings_than_its_own(tmp_path):
    from dataclasses import asdict

    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import compose_world
    from flamingo_lab.sweep import check_world

    world = asdict(compose_world("tiny"))
    _write_manifest(tmp_path, format=WORLD_FORMAT, config=world)
    check_world(tmp_path, "tiny")  # the sweep's own world
    mine = world["position_words"]
    other = {"row_first": "column_first", "column_first": "row_first"}[mine]
    _write_manifest(tmp_path, format=WORLD_FORMAT, config={**world, "position_words": other, "seed": world["seed"] + 5})
    with pytest.raises(ValueError, match=rf"other settings than the sweep's world 'tiny' \(conf/world/tiny.yaml\): "
                       rf"position_words: '{other}' there, '{mine}' in the config; seed: {world['seed'] + 5} there, "
                       rf"{world['seed']} in the config\. Rewrite it with `flamingo-data world=tiny out_dir="):
        check_world(tmp_path, "tiny")
    with pytest.raises(ValueError, match=r"\(the runs made on the old world then train again\), or train on it as "
                       r"it is with `worlds.smoke=null`"):
        check_world(tmp_path, "tiny", "smoke")
    _write_manifest(tmp_path, format="flamingo-lab-world/1", config=world)
    with pytest.raises(ValueError, match=r"holds a world this version cannot read \(format 'flamingo-lab-world/1'\)"):
        check_world(tmp_path, "tiny")
    (tmp_path / "world.json").write_text("[]")
    with pytest.raises(ValueError, match=r"holds no world manifest \(a JSON list\): rewrite it with `flamingo-data"):
        check_world(tmp_path, "tiny")
    assert run_mod.data_fingerprint(tmp_path)  # a key all the same (the run then fails reading it)
    (tmp_path / "world.json").write_text("{")
    with pytest.raises(ValueError, match=r"world.json is not valid JSON"):
        check_world(tmp_path, "tiny")
    _write_manifest(tmp_path, format="flamingo-lab-tasks/1", tasks={})  # imported data: used as it is
    check_world(tmp_path, "tiny")


def test_the_sweep_checks_its_default_data_root_and_trains_on_a_named_one_as_it_is(tmp_path, monkeypatch):
    from dataclasses import asdict

    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import compose_world
    from flamingo_lab.sweep import ensure_world

    monkeypatch.chdir(tmp_path)  # the smoke scale's data.root, data/tiny, is relative
    world = asdict(compose_world("tiny"))
    _write_manifest(tmp_path / "data" / "tiny", format=WORLD_FORMAT, config={**world, "seed": world["seed"] + 1})
    with pytest.raises(ValueError, match="other settings than the sweep's world 'tiny'"):
        ensure_world(load_sweep(SWEEP, ["scale=smoke"]), {})
    assert ensure_world(load_sweep(SWEEP, ["scale=smoke", "worlds.smoke=null"]), {}) == Path("data/tiny")
    named = tmp_path / "data" / "tiny"
    assert ensure_world(load_sweep(SWEEP, ["scale=smoke", f"data.root={named}"]), {}) == named


def test_the_sweep_writes_and_checks_the_pretraining_stages_world_too(tmp_path, monkeypatch):
    """Where a scale gives the stages a world of their own (pretrain.data_root; the embedded scale's
    data/embedded), the sweep writes it from pretrain_worlds when missing and refuses one written otherwise."""
    from dataclasses import asdict

    import flamingo_lab.sweep as sweep_mod
    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import compose_world
    from flamingo_lab.sweep import ensure_world

    monkeypatch.chdir(tmp_path)  # the embedded scale's worlds, data/embedded_flamingo and data/embedded, are relative
    written = []
    monkeypatch.setattr(sweep_mod.subprocess, "run", lambda command, **kw: written.append(command[1:]))
    _write_manifest(tmp_path / "data" / "embedded_flamingo", format=WORLD_FORMAT,
                    config=asdict(compose_world("embedded_flamingo")))
    with pytest.raises(FileNotFoundError, match=r"no world at pretrain.data_root=data/embedded .*pretrain_worlds.embedded"):
        ensure_world(load_sweep(SWEEP, ["pretrain_worlds.embedded=null"]), {})
    assert ensure_world(load_sweep(SWEEP, []), {}) == Path("data/embedded_flamingo")
    assert written == [["world=embedded", "out_dir=data/embedded"]]
    world = asdict(compose_world("embedded"))
    _write_manifest(tmp_path / "data" / "embedded", format=WORLD_FORMAT, config=world)
    assert ensure_world(load_sweep(SWEEP, []), {}) == Path("data/embedded_flamingo")  # its own world: accepted
    _write_manifest(tmp_path / "data" / "embedded", format=WORLD_FORMAT, config={**world, "seed": world["seed"] + 1})
    with pytest.raises(ValueError, match=r"pretrain.data_root=data/embedded holds a world written with other "
                                         r"settings than the sweep's world 'embedded'.*pretrain_worlds.embedded=null"):
        ensure_world(load_sweep(SWEEP, []), {})
    assert ensure_world(load_sweep(SWEEP, ["pretrain_worlds.embedded=null"]), {}) == Path("data/embedded_flamingo")
    assert ensure_world(load_sweep(SWEEP, ["pretrain.data_root=data/embedded"]), {})  # named: as it is
    assert len(written) == 1


def test_failure_is_recorded_then_raised_or_caught(small_cfg, tmp_path, monkeypatch):
    def boom(cfg, run_dir):
        raise RuntimeError("boom inside training")

    monkeypatch.setattr(run_mod, "train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_mod.run(small_cfg, tmp_path / "single")
    recorded = json.loads((tmp_path / "single" / "results.json").read_text())
    assert recorded["status"] == "failed" and recorded["error"] == "RuntimeError: boom inside training"
    assert "boom inside training" in recorded["traceback"] and "Traceback" in recorded["traceback"]
    assert recorded["experiment"] == "no_tanh" and recorded["config"]["seed"] == 0
    caught = run_mod.run(small_cfg, tmp_path / "multi", catch=True)  # a multirun: returns, does not raise
    assert caught["status"] == "failed"
    assert json.loads((tmp_path / "multi" / "results.json").read_text())["status"] == "failed"

    from flamingo_lab.analysis.table import flatten_results

    row = flatten_results(caught)
    assert row["status"] == "failed" and row["experiment"] == "no_tanh" and row["seed"] == 0
    assert row["error"].startswith("RuntimeError")


def test_a_run_folder_in_use_is_left_alone(small_cfg, tmp_path, monkeypatch):
    """A second process in a folder where a run is going on (a second sweep on the same `out`, or the joblib
    workers of a killed sweep) stops before touching it; once the first one ends, the folder is free."""
    import fcntl

    calls = []
    monkeypatch.setattr(run_mod, "train", lambda cfg, run_dir: calls.append(1) or {"status": "complete"})
    holder = run_mod._lock_run_folder(tmp_path)  # the live run: holds the lock, its pid inside
    (tmp_path / "results.json").write_text('{"status": "running elsewhere"}')
    with pytest.raises(run_mod.RunFolderBusy, match=rf"in use by another run \(pid {os.getpid()}\).*pkill -f loky"):
        run_mod.run(small_cfg, tmp_path)
    busy = run_mod.run(small_cfg, tmp_path, catch=True)  # a multirun: recorded as busy, the others go on
    assert busy["status"] == "busy" and "in use" in busy["error"] and not calls
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "running elsewhere"}  # untouched
    holder.close()  # the first run ends (or dies: the OS drops the lock)
    assert run_mod.run(small_cfg, tmp_path)["status"] == "complete" and calls == [1]
    with open(tmp_path / run_mod.RUN_LOCK) as fh:  # and the run released it when it returned
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_single_run_failure_exits_nonzero_and_is_recorded(tiny_world_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "flamingo-train"), "experiment=baseline", "scale=tiny", f"data.root={tiny_world_dir}",
         "logger=none", "model.xattn.every=0", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    recorded = json.loads((run_dir / "results.json").read_text())
    assert recorded["status"] == "failed" and "every" in recorded["error"], recorded["error"]


# --- the smoke sweep of every row, end to end (slow) ------------------------------------------------

BROKEN_ROW = """# @package _global_
defaults: [baseline]
model: {xattn: {every: 0}}   # rejected when the model is built, inside training
experiment: broken
"""


def _sweep(tmp_path, *args) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "flamingo-sweep"), str(SWEEP), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, time.perf_counter() - started


@pytest.mark.slow
def test_smoke_sweep_of_every_row_skips_on_rerun_records_failures_and_renders(tmp_path):
    """Every Table 3 row at scale=smoke (1 seed) plus a broken row: the sweep writes its own tiny world,
    every row completes, the broken one is recorded as failed without stopping the others; a rerun
    skips the complete rows; the table, plots and the notebook render from the folder."""
    extra = tmp_path / "extra_conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text(BROKEN_ROW)
    out, world = tmp_path / "sweep", tmp_path / "world"
    rows = ["baseline", "broken", *ROW_ORDER[1:]]
    args = ["scale=smoke", "seeds=1", "jobs=1", "threads=1", f"out={out}", "rows=[" + ",".join(rows) + "]",
            f"data.root={world}", f"hydra.searchpath=[file://{extra.parent}]"]
    proc, first = _sweep(tmp_path, *args)
    log = proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.returncode == 1, log  # one failed run: not all complete
    assert (world / "world.json").is_file()  # written by the sweep

    results = {row: json.loads((out / row / "seed0" / "results.json").read_text()) for row in rows}
    failed = results.pop("broken")
    assert failed["status"] == "failed" and "every" in failed["error"] and failed["traceback"]
    for row, r in results.items():
        assert r["status"] == "complete", (row, r.get("error"), r.get("traceback"))
        assert r["experiment"] == row and r["seed"] == 0 and r["run_name"] == f"{row}-s0"
        assert r["eval"]["overall_score"] is not None and r["params"]["total"] > 0
        assert r["step_time_s"]["median"] > 0 and r["config"]["logger"]["group"] == "table3-smoke"
        assert r["ablation"] == {**ablation_choices(compose(["experiment=baseline", "scale=smoke"])),
                                 **ROW_CHANGES[row][1]}
        assert list((out / row / "seed0" / "wandb").glob("offline-run-*")), row
    for name in ["table3.md", "table3.html", "overall.png", "loss_curves.png", "runs.csv", "baseline.md"]:
        assert (out / name).is_file(), name
    # the baseline row alone carries the text-description control, reported beside its image scores
    assert results["baseline"]["eval"]["controls"]["text"]["vqav2"]["4"]["n"] > 0
    assert not results["no_m3w"]["eval"]["controls"]
    assert "| vqav2 | all |" in (out / "baseline.md").read_text() and "text control" in (out / "baseline.md").read_text()
    table = (out / "table3.md").read_text()
    lines = table.split("\n\n")[0]  # the table; the note on the step column below it
    assert lines.count("\n") == 2 + len(ROW_ORDER)  # header, rule, one line per row; the broken row too:
    assert "| broken | 0 (+1 failed) |" in table  # a row whose every seed failed stays in the table, as failed

    mtimes = {row: (out / row / "seed0" / "results.json").stat().st_mtime for row in results}
    proc, again = _sweep(tmp_path, *args)
    assert proc.returncode == 1
    assert proc.stdout.count("skipped:") + proc.stderr.count("skipped:") == len(ROW_ORDER)
    # the sweep knew beforehand: each complete run's config key is what composing its overrides gives
    assert f"1 of {len(rows)} runs to train; {len(ROW_ORDER)} complete for this config are skipped" in proc.stdout
    assert mtimes == {row: (out / row / "seed0" / "results.json").stat().st_mtime for row in results}
    assert again < first / 2, (again, first)
    print(f"smoke sweep of {len(rows)} rows: {first:.0f} s; rerun (all skipped): {again:.0f} s")

    notebook = tmp_path / "table3.ipynb"
    proc = subprocess.run(
        [str(BIN / "papermill"), str(REPO / "notebooks" / "table3.ipynb"), str(notebook), "-p", "sweep_dir", str(out),
         "-k", "python3", "--cwd", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    cells = json.loads(notebook.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    kinds = {k for o in outputs for k in o.get("data", {})}
    assert {"text/markdown", "text/html", "image/png"} <= kinds
    assert any("broken" in json.dumps(o) for o in outputs)  # the failed run is listed


@pytest.mark.slow
def test_two_runs_side_by_side_in_worker_processes_with_progress_lines(tmp_path):
    """jobs=2 (the embedded default): runs go to joblib's loky worker processes, whose default start
    method DataLoader workers cannot use; the loader names its own, every run completes, and the sweep
    prints a line per finished run instead of interleaved progress bars."""
    out = tmp_path / "sweep"
    proc, _ = _sweep(tmp_path, "scale=smoke", "seeds=2", "jobs=2", "threads=1", f"out={out}", "rows=[baseline]",
                     f"data.root={tmp_path / 'world'}", "data.num_workers=1", "render=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for seed in (0, 1):
        r = json.loads((out / "baseline" / f"seed{seed}" / "results.json").read_text())
        assert r["status"] == "complete" and r["config"]["data"]["num_workers"] == 1
        assert r["config"]["trainer"]["enable_progress_bar"] is False
    assert "2/2 runs finished" in proc.stdout


def test_progress_lines_count_finished_runs_and_estimate_from_the_rate_after_the_first(tmp_path, monkeypatch, capsys):
    """A line each time runs finish; runs complete before the sweep started for the config it gives them now
    are not to do, a run complete for an older config is; the estimate uses the rate after the first finish
    (the first runs also wait for the pretraining stages)."""
    import flamingo_lab.sweep as sweep_mod
    from flamingo_lab.config import compose
    from flamingo_lab.training.run import config_key

    spec = load_sweep(SWEEP, ["rows=[baseline,no_m3w,no_tanh]", "seeds=2"])
    paths = {(r, s): tmp_path / r / f"seed{s}" / "results.json" for r in ("baseline", "no_m3w", "no_tanh") for s in (0, 1)}
    for p in paths.values():
        p.parent.mkdir(parents=True)
    done_before = {("baseline", 0), ("no_tanh", 0), ("no_tanh", 1)}
    keys = {k: config_key(compose(sweep_mod.job_overrides(spec, *k))) for k in done_before}
    keys[("no_tanh", 1)] = "an older config"  # complete, but for another config: it trains again
    for k in done_before:
        paths[k].write_text(json.dumps({"status": "complete", "config_key": keys[k]}))
        os.utime(paths[k], (0, 0))  # finished long before this sweep
    finishing = [("baseline", 1), ("no_m3w", 0), ("no_m3w", 1), ("no_tanh", 1)]  # one more per poll
    state = {"polls": 0}

    def fake_status(_spec):
        return {k: {"status": "complete" if k in done_before or k in finishing[:state["polls"]] else "missing",
                    "path": str(p), "error": None} for k, p in paths.items()}

    monkeypatch.setattr(sweep_mod, "run_status", fake_status)
    real_todo = sweep_mod.runs_to_train(spec)
    assert sorted(real_todo) == sorted(finishing)
    spec.force = True  # force=true: every run trains again
    assert sorted(sweep_mod.runs_to_train(spec)) == sorted(paths)
    spec.force = False

    class FakeProc:
        def wait(self, timeout=None):
            state["polls"] += 1
            for k in finishing[:state["polls"]]:
                paths[k].write_text("{}")
            if state["polls"] < 4:
                raise subprocess.TimeoutExpired("flamingo-train", timeout)
            return 0

    clock = iter([100.0, 160.0, 220.0, 280.0])
    sweep_mod.report_progress(spec, FakeProc(), started=0.0, every=0.0, clock=lambda: next(clock))
    out = capsys.readouterr().out.splitlines()
    assert "[flamingo-sweep] 4 of 6 runs to train; 2 complete for this config are skipped" in out
    lines = [ln for ln in out if "runs finished" in ln]
    assert lines == ["[flamingo-sweep] 1/4 runs finished, 1 min 40 s elapsed",
                     "[flamingo-sweep] 2/4 runs finished, 2 min 40 s elapsed, ~2 min 00 s left",
                     "[flamingo-sweep] 3/4 runs finished, 3 min 40 s elapsed, ~1 min 00 s left",
                     "[flamingo-sweep] 4/4 runs finished, 4 min 40 s elapsed"]


def test_render_reads_only_the_sweeps_current_runs(tmp_path, capsys):
    """A sweep folder that still holds an earlier sweep's extra seed, a run complete for an older config and a
    stray flamingo-eval results.json: Table 3 is made of this sweep's own current runs only (before, every
    results.json under the folder was read: the extra seed and the stale run were counted, and the eval file,
    with no status or experiment, became a complete baseline seed)."""
    import pandas as pd

    import flamingo_lab.sweep as sweep_mod
    from flamingo_lab.analysis.paper import TASKS
    from flamingo_lab.config import compose
    from flamingo_lab.training.run import config_key

    spec = load_sweep(SWEEP, ["rows=[baseline,no_m3w]", "seeds=2", f"out={tmp_path}"])

    def write(row, seed, overall, key=None):
        key = key or config_key(compose(sweep_mod.job_overrides(spec, row, seed)))
        folder = tmp_path / row / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "experiment": row, "status": "complete", "config_key": key, "config": {"seed": seed},
            "params": {"total": 1000}, "step_time_s": {"median": 0.1}, "loss": {"final": 2.0},
            "eval": {"scores": {t: {"4": {"metric": "m", "score": overall}} for t in TASKS},
                     "overall_score": overall, "overall_shots": 4}}))

    write("baseline", 0, 60.0)
    write("baseline", 1, 62.0)
    write("baseline", 2, 10.0, key="any")  # an earlier sweep's third seed
    write("no_m3w", 0, 40.0)
    write("no_m3w", 1, 90.0, key="an older config")  # complete, for another config
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"eval": {"overall_score": 0.0}}))

    paths, stale = sweep_mod.table_paths(spec)
    assert sorted(paths) == sorted(str(tmp_path / r / f"seed{s}" / "results.json")
                                   for r, s in [("baseline", 0), ("baseline", 1), ("no_m3w", 0)])
    assert stale == [str(tmp_path / "no_m3w" / "seed1" / "results.json")]
    sweep_mod.render(tmp_path, spec)
    out = capsys.readouterr().out
    assert "no_m3w/seed1/results.json is complete for another config" in out
    assert "2 results.json under" in out and "outside this sweep's rows and seeds" in out
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(zip(runs["experiment"], runs["seed"])) == [("baseline", 0), ("baseline", 1), ("no_m3w", 0)]
    table = (tmp_path / "table3.md").read_text()
    assert "| baseline | 2 |" in table and "| 61.0 ± 12.7 (70.7) |" in table  # t(1) = 12.706, s = sqrt(2), n = 2
    assert "| w/o M3W | 1 |" in table and "| 40.0 (53.4) | -21.0 (-17.3) |" in table


def test_a_results_json_without_status_in_a_runs_folder_is_no_complete_run(tmp_path):
    """flamingo-eval writes results.json without a status: in a run's folder it counted as complete for the
    sweep's tally (and its exit code), while the table left it out."""
    from flamingo_lab.sweep import run_status, runs_to_train

    spec = load_sweep(SWEEP, ["rows=[baseline]", "seeds=1", f"out={tmp_path}"])
    folder = tmp_path / "baseline" / "seed0"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"eval": {"overall_score": 50.0}}))
    assert run_status(spec)["baseline", 0]["status"] == "unknown"
    assert runs_to_train(spec) == [("baseline", 0)]
