"""Training end to end: config composition, the Lightning run, results.json, W&B offline, multirun, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from flamingo_lab.config import CONF_DIR, ablation_choices, compose
from flamingo_lab.models import build_flamingo

BIN = Path(sys.executable).parent


def tiny_overrides(world: Path, *extra: str) -> list[str]:
    return ["scale=tiny", f"data.root={world}", *extra]


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [str(BIN / "flamingo-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"flamingo-train {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize(
    "group, choice",
    [(g, c) for g in ["model/vision", "model/resampler", "model/xattn", "model/lm", "scale"] for c in group_choices(g)],
)
def test_every_model_choice_composes_and_builds(group, choice, tiny_tokenizer_dir):
    overrides = ["scale=tiny", f"{group}={choice}", f"model.lm.tokenizer={tiny_tokenizer_dir}"]
    if group == "scale":
        overrides = overrides[1:]
    cfg = compose(overrides)
    model = build_flamingo(cfg.model)
    counts = model.parameter_counts()
    assert counts["trainable"] > 0 and counts["total"] > counts["trainable"]  # frozen LM and vision


@pytest.mark.parametrize("choice", group_choices("trainer"))
def test_every_trainer_config_builds_a_lightning_trainer(choice, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import StrategyRegistry

    import flamingo_lab.training.sharding  # noqa: F401 -- registers fsdp2 (as flamingo-train's import does)

    cfg = compose([f"trainer={choice}"])
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert kwargs["gradient_clip_val"] == 1.0 and kwargs["max_steps"] > 0
    assert kwargs["strategy"] == "auto" or kwargs["strategy"] in StrategyRegistry
    if not torch.cuda.is_available():  # no GPU here: the same strategy on one CPU process
        kwargs.update(accelerator="cpu", devices=1, precision="32-true")
    trainer = pl.Trainer(**kwargs, logger=False, default_root_dir=tmp_path)
    expected = {"cpu": "SingleDeviceStrategy", "gpu": "SingleDeviceStrategy", "ddp": "DDPStrategy",
                "fsdp": "FSDP2Strategy"}
    assert type(trainer.strategy).__name__ == expected[choice]


def test_fsdp_clips_the_global_norm_through_the_wrapped_module(tiny_world_dir):
    """Lightning's FSDP precision raises on gradient_clip_algorithm='norm' (Lightning #19235; seen on a GPU
    run): under FSDP the module clips through the wrapped model's clip_grad_norm_ (the norm over every
    shard); clipping by value, and every other strategy, still goes through Lightning."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from flamingo_lab.training.module import FlamingoModule

    cfg = OmegaConf.to_container(compose(["scale=tiny", f"data.root={tiny_world_dir}"]), resolve=True)
    module = FlamingoModule(cfg)
    calls = []
    wrapped = SimpleNamespace(clip_grad_norm_=lambda max_norm: calls.append(("fsdp", max_norm)))
    strategy = FSDPStrategy()
    strategy.model = wrapped
    module.trainer = SimpleNamespace(strategy=strategy)
    module.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: calls.append(
        ("lightning", gradient_clip_val, gradient_clip_algorithm))
    module.configure_gradient_clipping(None, 1.0, "norm")
    module.configure_gradient_clipping(None, 0.5, "value")
    module.trainer = SimpleNamespace(strategy=SimpleNamespace())  # e.g. DDP or a single device
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert calls == [("fsdp", 1.0), ("lightning", 0.5, "value"), ("lightning", 1.0, "norm")]


def test_lightnings_fsdp1_on_several_processes_is_refused_with_the_fix():
    """Lightning's FSDP1 (trainer.strategy=fsdp) keeps each parameter as this rank's shard outside a forward pass
    (a rank may hold none of a gate), where the gate logger and the evaluation read it: refused on more than one
    process, naming trainer=fsdp (FSDP2), which gathers them (tests/test_fsdp.py). FSDP1 builds only with a GPU,
    so the check is given the trainer's two facts it reads."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from flamingo_lab.training.sharding import FSDP2Strategy, check_strategy

    with pytest.raises(ValueError, match="trainer=fsdp .*fsdp2"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy(), world_size=2))
    check_strategy(SimpleNamespace(strategy=FSDPStrategy(), world_size=1))  # one GPU: NO_SHARD, whole parameters
    check_strategy(SimpleNamespace(strategy=FSDP2Strategy(), world_size=2))
    check_strategy(SimpleNamespace(strategy=DDPStrategy(), world_size=2))


def test_an_unsharded_checkpoint_is_refused_to_a_sharded_run_even_with_force(tmp_path, caplog):
    """Resumed under trainer=fsdp, a DDP or single-process checkpoint stopped inside Lightning with 'Missing
    optimizer state for parameter ...' (its FSDP2 loader reads the optimiser state in the model's parameter order,
    ours is in the order of the parameter groups): refused before training, force=true or not, naming the way
    out. The other way (a sharded run's checkpoint under DDP) is a changed setting that force=true allows."""
    from flamingo_lab.training.run import ResumeRefused, check_resume

    def config(strategy):
        return OmegaConf.to_container(compose(["scale=tiny", f"trainer.strategy={strategy}"]), resolve=True)

    for written, strategy, force in [("ddp", "fsdp2", True), ("auto", "fsdp2", True), ("fsdp2", "ddp", True)]:
        ckpt = tmp_path / f"{written}.ckpt"
        torch.save({"global_step": 1, "hyper_parameters": {"cfg": config(written)}}, ckpt)
        if strategy == "fsdp2":
            with pytest.raises(ResumeRefused, match=f"trainer.strategy={written}.*cannot continue it.*own strategy"):
                check_resume(config(strategy), str(ckpt), force=force)
        else:
            with caplog.at_level("WARNING"):
                check_resume(config(strategy), str(ckpt), force=force)  # resumes anyway
            assert "trainer.strategy: 'fsdp2' -> 'ddp'" in caplog.text
            with pytest.raises(ResumeRefused, match="force=true to resume anyway"):
                check_resume(config(strategy), str(ckpt), force=False)


def test_compose_equals_command_line_config(tmp_path):
    overrides = ["model/lm=gpt2", "optim.lr=0.01", "trainer.max_steps=7"]
    proc = subprocess.run(
        [str(BIN / "flamingo-train"), *overrides, "--cfg", "job", "--resolve"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    from_cli = yaml.safe_load(proc.stdout)
    from_compose = OmegaConf.to_container(compose(overrides), resolve=True)
    assert from_cli == from_compose
    assert from_compose["model"]["lm"]["arch"]["model_type"] == "gpt2" and from_compose["trainer"]["max_steps"] == 7


def test_ablation_choices_are_read_from_the_config():
    choices = ablation_choices(compose(["model/lm=gpt2", "model.xattn.every=2"]))
    assert choices["lm"] == "gpt2" and choices["xattn_every"] == "2" and choices["resampler"] == "perceiver"


def test_tiny_run_end_to_end_loss_falls_and_writes_results(tiny_world_dir, tmp_path):
    """A tiny `flamingo-train` run: the training loss starts at ln(vocab) and falls by at least 25% in 60 steps.

    The LM is frozen and randomly initialised here, so only the gated blocks learn; a frozen random
    LM's logits are bounded by its width (0.02-scale tied embeddings), hence width 128 for this test
    (observed: 4.33 -> 2.64 in 60 steps, about a second).
    """
    run_dir = tmp_path / "run"
    run_cli(
        tiny_overrides(
            tiny_world_dir, "trainer.max_steps=60", "model.lm.arch.hidden_size=128",
            "model.lm.arch.intermediate_size=256", "optim.lr=5e-3", "optim.gate_lr_mult=10",
            f"hydra.run.dir={run_dir}",
        ),
        cwd=tmp_path,
    )
    results = json.loads((run_dir / "results.json").read_text())
    loss = results["loss"]
    vocab = json.loads((tiny_world_dir / "world.json").read_text())["vocab_size"]
    assert abs(loss["first"] - math.log(vocab)) < 0.1 * math.log(vocab), loss  # gates at 0: near-uniform start
    assert loss["final"] < 0.75 * loss["first"], loss  # falls clearly, not by noise
    assert loss["val"] is not None and loss["val"] < loss["first"]
    assert results["steps"] == 60
    assert results["params"]["trainable"] < results["params"]["total"]
    assert results["step_time_s"]["mean"] > 0
    assert results["ablation"]["xattn"] == "gated" and results["ablation"]["lm_freeze"] == "frozen"
    assert results["config"]["trainer"]["max_steps"] == 60
    gates = results["gates"]
    assert gates and all(abs(v) > 0 for v in gates.values())  # every gate moved off 0
    # offline W&B run with the gate values logged during training
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # what the numbers may depend on beyond the config: the CPU kernels torch used and the code's commit
    machine = results["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] >= 1 and machine["cpu"]
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout (CI's fresh clone is one)
        assert machine["code"]["commit"] == head.stdout.strip() and isinstance(machine["code"]["dirty"], bool)


def test_checkpoint_reloads_on_its_own_and_resumes(tiny_world_dir, tmp_path):
    from flamingo_lab.training.module import FlamingoModule
    from flamingo_lab.training.run import train

    cfg = compose(tiny_overrides(tiny_world_dir, "trainer.max_steps=6", "logger=none"))
    train(cfg, tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    module = FlamingoModule.load_from_checkpoint(ckpt)  # no modules passed in: built from the stored config
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    resumed = train(compose(tiny_overrides(tiny_world_dir, "trainer.max_steps=10", "logger=none", "resume=last")), tmp_path)
    assert resumed["steps"] == 10


def test_multirun_over_two_values(tiny_world_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        ["-m", *tiny_overrides(tiny_world_dir, "trainer.max_steps=4", "logger=none", "seed=1,2"),
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    results = sorted(sweep_dir.glob("*/results.json"))
    assert len(results) == 2
    seeds = sorted(json.loads(p.read_text())["config"]["seed"] for p in results)
    assert seeds == [1, 2]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_world_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    run_cli(
        tiny_overrides(
            tiny_world_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.max_steps=6", "logger=none", f"hydra.run.dir={run_dir}",
        ),
        cwd=tmp_path,
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6 and results["world_size"] == 2
    assert results["config"]["trainer"]["strategy"] == "ddp"


def test_eval_curve_records_few_shot_scores_against_steps(tiny_world_dir, tmp_path):
    from flamingo_lab.training.run import train

    cfg = compose(tiny_overrides(
        tiny_world_dir, "trainer.max_steps=6", "logger=none", "eval.at_end_of_training=false",
        "eval.curve.every_n_steps=3", "eval.curve.tasks=[vqav2]", "eval.curve.shots=[0]", "eval.curve.max_items=4",
    ))
    results = train(cfg, tmp_path)
    points = results["eval_curve"]
    assert [p["step"] for p in points] == [0, 3, 6]
    for p in points:
        entry = p["scores"]["vqav2"]["0"]
        assert 0.0 <= entry["score"] <= 100.0 and any(k.startswith("qtype=") for k in entry["breakdown"])
    assert "eval" not in results  # the end-of-training evaluation was switched off


# --- resume: a resumed run is the uninterrupted one ------------------------------------------------------


def _quiet(world: Path, *extra: str) -> list[str]:
    return tiny_overrides(world, "logger=none", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                          "eval.at_end_of_training=false", *extra)


@pytest.mark.parametrize("optimisation", ["accumulate", "round_robin", "round_robin_update"])
def test_a_resumed_run_trains_and_reports_as_the_uninterrupted_one(optimisation, tiny_world_dir, tmp_path):
    """Stopped at step 6 and resumed to 12, a run sees the batches the uninterrupted run sees (each stream goes
    on where it stopped; round robin at the source whose turn it was: 6 is no multiple of 4 sources), and its
    results.json holds the whole loss curve, every step time, the accuracy curve and the samples of all 12 steps.
    Before, the resumed streams were re-seeded (other batches, other losses) and round robin started again
    at the first source, and the results held only what came after the resume."""
    from flamingo_lab.training.run import train

    mode = optimisation.removesuffix("_update")
    extra = [f"data.optimisation={mode}", *(["++data.round_robin_step=update"] if mode != optimisation else []),
             "eval.curve.every_n_steps=3", "eval.curve.tasks=[vqav2]",
             "eval.curve.shots=[0]", "eval.curve.max_items=2"]
    whole = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=12", *extra)), tmp_path / "whole")
    train(compose(_quiet(tiny_world_dir, "trainer.max_steps=6", *extra)), tmp_path / "cut")
    resumed = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=12", "resume=last", *extra)), tmp_path / "cut")

    assert resumed["steps"] == whole["steps"] == 12
    assert resumed["loss"]["curve"]["step"] == list(range(1, 13))
    assert resumed["loss"]["curve"]["loss"] == pytest.approx(whole["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)
    assert resumed["gates"] == pytest.approx(whole["gates"], rel=1e-4, abs=1e-7)
    assert resumed["data"]["per_source"] == whole["data"]["per_source"]
    assert [p["step"] for p in resumed["eval_curve"]] == [p["step"] for p in whole["eval_curve"]] == [0, 3, 6, 9, 12]
    cycle = 4 if optimisation == "round_robin_update" else 1  # a step time spans every source once
    assert resumed["step_time_s"]["n"] >= 12 // cycle - 1 and resumed["step_time_s"]["mean"] > 0


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_one(tiny_world_dir, tmp_path):
    """A trained LM with dropout (GPT-2's config has 0.1; the LM fine-tuned row trains it) draws a mask at every
    step. The checkpoint held no RNG state, and the resumed run's generator stood wherever the loaders and
    Lightning had left it, so from the cut on it trained with other masks: other losses, other weights. Each
    training step now draws from a generator seeded by (seed, step), so resuming changes nothing."""
    from flamingo_lab.training.run import train

    extra = ["model/lm=gpt2", "model.lm.freeze=train_pretrained", "model.lm.arch.resid_pdrop=0.3",
             "model.lm.arch.embd_pdrop=0.3", "model.lm.arch.attn_pdrop=0.3"]
    whole = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=8", *extra)), tmp_path / "whole")
    train(compose(_quiet(tiny_world_dir, "trainer.max_steps=4", *extra)), tmp_path / "cut")
    resumed = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=8", "resume=last", *extra)), tmp_path / "cut")
    assert resumed["loss"]["curve"]["loss"] == pytest.approx(whole["loss"]["curve"]["loss"], rel=1e-5, abs=1e-6)
    assert resumed["gates"] == pytest.approx(whole["gates"], rel=1e-4, abs=1e-7)
    # and the masks are drawn: the same run without dropout trains to other losses
    plain = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=8", *extra[:2])), tmp_path / "plain")
    assert plain["loss"]["curve"]["loss"][1:] != pytest.approx(whole["loss"]["curve"]["loss"][1:], rel=1e-4)


def test_a_round_robin_step_sees_every_source_once_as_an_accumulating_step_does(tiny_world_dir, tmp_path):
    """The paper times a round-robin step over all datasets (1.68 s against accumulation's 1.74 s), so at the same
    number of steps both see the same data. trainer.max_steps counted single updates before: the round-robin row
    trained on a quarter of the baseline's batches. data.round_robin_step=update keeps that meaning."""
    from flamingo_lab.training.run import train

    seen = {}
    for name, extra in {"accumulate": [], "cycle": ["data.optimisation=round_robin"],
                        "update": ["data.optimisation=round_robin", "++data.round_robin_step=update"]}.items():
        r = train(compose(_quiet(tiny_world_dir, "trainer.max_steps=4", *extra)), tmp_path / name)
        seen[name] = {s: c["seen"] for s, c in r["data"]["per_source"].items()}
        assert r["steps"] == 4 and r["updates"] == (16 if name == "cycle" else 4)
        assert r["loss"]["curve"]["step"] == [1, 2, 3, 4]  # training steps, whatever they hold
    assert seen["cycle"] == seen["accumulate"]
    assert sum(seen["update"].values()) * 4 == pytest.approx(sum(seen["accumulate"].values()), rel=0.3)


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_backward_default(tmp_path):
    """A setting added since a checkpoint was written (KEY_BACKWARD_DEFAULTS) is absent from its stored config.
    At the value that computes what the checkpoint's run computed, resuming is not refused as "1 setting differs"
    (the config key already keeps such runs complete); at another value it is."""
    from omegaconf import open_dict

    from flamingo_lab.training.run import KEY_BACKWARD_DEFAULTS, ResumeRefused, check_resume

    cfg = compose(["scale=tiny", "data.root=/nonexistent"])
    assert cfg.model.vision.cache_mib == KEY_BACKWARD_DEFAULTS["model.vision.cache_mib"] == 0
    before = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(before):
        del before.model.vision["cache_mib"]  # as written before the feature cache existed
    ckpt = tmp_path / "before.ckpt"
    torch.save({"global_step": 1, "hyper_parameters": {"cfg": OmegaConf.to_container(before)}}, ckpt)
    check_resume(OmegaConf.to_container(cfg, resolve=True), str(ckpt))
    cached = compose(["scale=tiny", "data.root=/nonexistent", "model.vision.cache_mib=64"])
    with pytest.raises(ResumeRefused, match=r"1 setting\(s\) differ: model.vision.cache_mib: None -> 64"):
        check_resume(OmegaConf.to_container(cached, resolve=True), str(ckpt))


def test_the_round_robin_step_enters_the_config_key_only_for_round_robin():
    """Accumulating runs keep their keys whether the setting is given or not; a round-robin config without it
    means a cycle now and trains again; `update` (the old meaning) drops out of the key as KEY_BACKWARD_DEFAULTS
    does, so runs made before the setting (their key had none) count only for `update`."""
    from flamingo_lab.training.run import KEY_BACKWARD_DEFAULTS, config_key

    base = ["scale=tiny", "data.root=/nonexistent"]
    acc = config_key(compose(base))
    assert config_key(compose([*base, "++data.round_robin_step=update"])) == acc
    assert config_key(compose([*base, "++data.round_robin_step=cycle"])) == acc
    rr = [*base, "data.optimisation=round_robin"]
    unset, cycle, update = (config_key(compose([*rr, *extra])) for extra in
                            ([], ["++data.round_robin_step=cycle"], ["++data.round_robin_step=update"]))
    assert unset == cycle != update
    assert KEY_BACKWARD_DEFAULTS["data.round_robin_step"] == "update"
    with pytest.raises(ValueError, match=r"data.round_robin_step must be one of \('cycle', 'update'\)"):
        from flamingo_lab.data.mixture import updates_per_step

        updates_per_step({**compose(rr).data, "round_robin_step": "epoch"})


def test_the_pretraining_world_enters_the_config_key_only_where_it_is_set(tmp_path):
    """Runs made before pretrain.data_root and data.video_weight / video_batch_ratio existed keep their keys at
    the values that computed what they computed; a run whose stages learn from a world of their own is keyed by
    that world's identity too, so rewriting it with other settings trains the run again."""
    import json
    from dataclasses import asdict

    from omegaconf import open_dict

    from flamingo_lab.data.world import WORLD_FORMAT
    from flamingo_lab.make_data import compose_world
    from flamingo_lab.training.run import config_key

    base = ["scale=tiny", "data.root=/nonexistent"]
    now = compose(base)
    before = compose(base)  # the config as written before the three settings existed
    with open_dict(before):
        before.data.sources.vtp.weight, before.data.sources.vtp.batch_ratio = 0.03, 0.25
        before.pretrain.cache_dir = "${data.root}/cache"
        del before.pretrain.data_root, before.data.video_weight, before.data.video_batch_ratio
    assert config_key(before) == config_key(now)
    assert config_key(compose([*base, "data.video_weight=0.2"])) != config_key(now)

    world = asdict(compose_world("tiny"))
    pre = tmp_path / "pre"
    pre.mkdir()

    def write(config, elapsed):
        (pre / "world.json").write_text(json.dumps({"format": WORLD_FORMAT, "config": config, "elapsed_s": elapsed}))

    write(world, 1.0)
    keyed = config_key(compose([*base, f"pretrain.data_root={pre}"]))
    assert keyed != config_key(now)
    write(world, 2.0)  # the same world written again
    assert config_key(compose([*base, f"pretrain.data_root={pre}"])) == keyed
    write({**world, "seed": world["seed"] + 1}, 1.0)  # rewritten with other settings: other stages
    assert config_key(compose([*base, f"pretrain.data_root={pre}"])) != keyed


def test_resume_refuses_another_config_and_keeps_the_results(tiny_world_dir, tmp_path):
    """The optimiser and schedule come from the checkpoint, so a resume with another optim.lr (or model, data,
    seed) trained neither config, silently. It is refused, naming the setting, and the folder's complete
    results.json stays; max_steps may change; force=true resumes anyway."""
    from flamingo_lab.training.run import ResumeRefused, run

    run(compose(_quiet(tiny_world_dir, "trainer.max_steps=4")), tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ResumeRefused, match=r"optim\.lr: 0\.002 -> 0\.01"):
        run(compose(_quiet(tiny_world_dir, "trainer.max_steps=6", "resume=last", "optim.lr=0.01")), tmp_path)
    assert (tmp_path / "results.json").read_text() == before
    assert run(compose(_quiet(tiny_world_dir, "trainer.max_steps=6", "resume=last")), tmp_path)["steps"] == 6
    forced = run(compose(_quiet(tiny_world_dir, "trainer.max_steps=8", "resume=last", "seed=3", "force=true")), tmp_path)
    assert forced["steps"] == 8


def test_loss_history_weighs_round_robin_sources_as_accumulation_does():
    """Round robin: each batch holds one source, its loss scaled lambda_s / mean lambda. A window of 10 steps over
    4 sources holds 3, 3, 2 and 2 turns; a plain mean of the scaled losses then swings with the cycle's phase
    (the curve and loss.final of the round-robin row). Each window is the mean over its sources."""
    from types import SimpleNamespace

    from flamingo_lab.data.mixture import loss_scale
    from flamingo_lab.training.callbacks import LossHistory

    data = {"batch_size": 4, "seq_len": 8, "max_images": 1, "optimisation": "round_robin",
            "sources": {"m3w": 1.0, "ltip": 0.2, "align": 0.2, "vtp": 0.03}}
    scale = loss_scale(data)
    history = LossHistory(every_n_steps=10)
    trainer = SimpleNamespace(global_step=0, max_steps=1000)
    names = list(scale)
    for k in range(40):
        trainer.global_step = k + 1
        source = names[k % len(names)]
        history.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0 * scale[source])}, {source: {}}, k)
    assert history.steps == [10, 20, 30, 40]
    assert history.losses == pytest.approx([2.0] * 4)  # sum_s lambda_s L_s / sum_s lambda_s with every L_s = 2


def test_a_run_trains_the_same_whether_its_pretraining_stage_was_built_now_or_found(tiny_world_dir, tmp_path):
    """Same config and seed, same run: the first run of a sweep builds the LM stage in its own process (which
    reseeds and draws from the global RNG), the next finds it in the cache. The Flamingo's new layers were
    initialised from whatever RNG state the build left, so the run that built the stage trained another model."""
    from flamingo_lab.training.run import train

    stage = [f"pretrain.cache_dir={tmp_path / 'cache'}", "pretrain.lm.enabled=true", "pretrain.lm.steps=5",
             "pretrain.lm.batch_size=4", "pretrain.lm.seq_len=32", "pretrain.lm.bf16=false", "trainer.max_steps=3"]
    built = train(compose(_quiet(tiny_world_dir, *stage)), tmp_path / "built")
    found = train(compose(_quiet(tiny_world_dir, *stage)), tmp_path / "found")
    assert built["pretrained"]["lm"]["built_now"] and not found["pretrained"]["lm"]["built_now"]
    assert built["loss"]["curve"] == found["loss"]["curve"]
    assert built["gates"] == found["gates"]


@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_an_lm_trained_with_the_flamingo_never_decays_its_embedding_rows(lm, tiny_tokenizer_dir):
    """optim.parameter_groups promises no weight decay on embedding rows; it found them by "embed" in the name,
    which GPT-2's token and position tables (``wte``, ``wpe``) do not have: with model.lm.freeze=train_pretrained
    they were decayed at 0.1 with the matrices."""
    from flamingo_lab.training.optim import parameter_groups

    cfg = compose(["scale=tiny", f"model/lm={lm}", f"model.lm.tokenizer={tiny_tokenizer_dir}",
                   "model.lm.freeze=train_pretrained"])
    model = build_flamingo(cfg.model)
    tables = {id(m.weight) for m in model.lm.modules() if isinstance(m, torch.nn.Embedding)}
    assert tables
    for group in parameter_groups(model, OmegaConf.to_container(cfg.optim, resolve=True)):
        for p in group["params"]:
            if id(p) in tables:
                assert group["weight_decay"] == 0.0 and group["name"].endswith("no_decay"), group["name"]


def test_a_resumed_run_logs_into_the_wandb_run_it_started(tmp_path):
    from flamingo_lab.training import run as run_mod

    cfg = compose(["experiment=no_tanh", "scale=tiny"])
    first = run_mod.make_logger(cfg, tmp_path)._wandb_init
    assert first["resume"] == "allow" and (tmp_path / "wandb_run_id").read_text().strip() == first["id"]
    cfg.resume = "last"
    assert run_mod.make_logger(cfg, tmp_path)._wandb_init["id"] == first["id"]  # before: a second W&B run
    cfg.resume = None
    assert run_mod.make_logger(cfg, tmp_path)._wandb_init["id"] != first["id"]  # a fresh run is a new W&B run
    cfg.resume = "auto"  # the default: the W&B run follows what the run does (training.run.train passes it)
    again = run_mod.make_logger(cfg, tmp_path, resuming=True)._wandb_init["id"]
    assert run_mod.make_logger(cfg, tmp_path, resuming=True)._wandb_init["id"] == again
    assert run_mod.make_logger(cfg, tmp_path, resuming=False)._wandb_init["id"] != again
    assert run_mod.make_logger(cfg, tmp_path)._wandb_init["id"] != again  # auto, no checkpoint found
