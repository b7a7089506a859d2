"""`flamingo-sweep SWEEP.yaml [key=value ...]`: a study (sweeps/table3.yaml) as a Hydra multirun of
flamingo-train, then its table and plots.

    flamingo-sweep sweeps/table3.yaml                              # 19 rows x 3 seeds (baseline 5), embedded
    flamingo-sweep sweeps/table3.yaml scale=smoke seeds=1 jobs=1 threads=1
    flamingo-sweep sweeps/table3.yaml rows=[baseline,no_m3w] force=true out=multirun/mine
    flamingo-sweep sweeps/table3.yaml render=only                  # only (re)write the table and plots

``row_seeds`` gives some rows more (or other) seeds at a scale; the runs the other rows lack go in a
second multirun after the first. Arguments named like a key of the sweep file set that key; every other
argument is a flamingo-train override given to every run. Each run lands in ``<out>/<row>/seed<k>/`` (results.json, W&B, checkpoints);
a run whose results.json is complete for the same config is skipped, a failed run is recorded there
(``status: failed``) and the others go on (flamingo_lab.training.run). The command exits 0 when every
run of the sweep is complete, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from flamingo_lab.config import CONF_DIR

BIN = Path(sys.executable).parent
#: Where each run of a sweep writes (Hydra interpolations, resolved per job).
RUN_SUBDIR = "${experiment}/seed${seed}"


def experiments(overrides: Sequence[str] = ()) -> list[str]:
    """The rows available to a sweep: conf/experiment/<row>.yaml, and <dir>/experiment/<row>.yaml for
    every ``file://<dir>`` of a ``hydra.searchpath=[...]`` override (experiments kept outside conf/)."""
    folders = [CONF_DIR]
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            folders += [Path(p.strip()[len("file://"):]) for p in o.split("=", 1)[1].strip("[]").split(",")
                        if p.strip().startswith("file://")]
    return sorted({p.stem for folder in folders for p in (folder / "experiment").glob("*.yaml")})


def load_sweep(path: str | Path, args: Sequence[str] = ()) -> DictConfig:
    """The sweep file with ``key=value`` arguments applied; arguments that are not its keys are appended
    to ``overrides`` (flamingo-train overrides for every run). ``seeds=`` given without ``row_seeds`` gives
    every row those seeds (the file's ``row_seeds`` are dropped); ``row_seeds={...}`` replaces the file's."""
    spec = OmegaConf.load(path)
    keyed, passed = [], []
    for arg in args:
        key = arg.split("=", 1)[0]
        (keyed if "=" in arg and key.split(".")[0] in spec else passed).append(arg)
    given = {arg.split("=", 1)[0].split(".")[0] for arg in keyed}
    if "row_seeds" in spec and ("row_seeds" in given or "seeds" in given):
        spec.row_seeds = {}
    spec = OmegaConf.merge(spec, OmegaConf.from_dotlist(keyed))
    spec.overrides = list(spec.get("overrides") or []) + passed
    rows = spec.rows if OmegaConf.is_list(spec.rows) else [spec.rows]
    spec.rows = [str(r) for r in rows]
    known = experiments(list(spec.overrides))
    unknown = sorted(set(spec.rows) - set(known))
    if unknown:
        raise ValueError(f"rows {unknown} have no conf/experiment/<row>.yaml; valid rows: {', '.join(known)}")
    row_seeds = _row_seeds(spec)
    unknown = sorted(set(row_seeds) - set(known))
    if unknown:
        raise ValueError(f"row_seeds.{spec.scale} names rows {unknown} that have no conf/experiment/<row>.yaml; "
                         f"valid rows: {', '.join(known)}")
    for row in row_seeds:
        _seed_list(row_seeds[row], f"row_seeds.{spec.scale}.{row}")
    _seed_list(spec.seeds, "seeds")
    return spec


def _row_seeds(spec: DictConfig) -> dict:
    """``row_seeds`` of the sweep's scale: {row: N or [seeds]} (rows not named there run ``seeds``)."""
    per_scale = spec.get("row_seeds") or {}
    return dict(per_scale.get(str(spec.scale)) or {})


def _seed_list(value, name: str = "seeds") -> list[int]:
    """``N`` -> 0..N-1; ``[..]`` -> those."""
    try:
        seeds = [int(s) for s in value] if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) \
            else list(range(int(value)))
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{name} must be a number of seeds or a list of seeds; got {value!r}") from exn
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"{name} must give at least one seed, each once and >= 0; got {value!r}")
    return seeds


def seeds_of(spec: DictConfig, row: str | None = None) -> list[int]:
    """The seeds of ``row`` (its ``row_seeds`` entry at the sweep's scale, else ``seeds``); without a row,
    ``seeds``. ``N`` -> 0..N-1; ``[..]`` -> those."""
    row_seeds = _row_seeds(spec)
    if row is not None and row in row_seeds:
        return _seed_list(row_seeds[row], f"row_seeds.{spec.scale}.{row}")
    return _seed_list(spec.seeds)


def runs_of(spec: DictConfig) -> list[tuple[str, int]]:
    """Every (row, seed) of the sweep, seed by seed (a partial sweep holds every row), rows in the file's order."""
    per_row = {row: seeds_of(spec, row) for row in spec.rows}
    all_seeds = sorted({s for seeds in per_row.values() for s in seeds})
    return [(row, seed) for seed in all_seeds for row in spec.rows if seed in per_row[row]]


def multiruns(spec: DictConfig) -> list[tuple[list[int], list[str]]]:
    """The Hydra multiruns that make :func:`runs_of`: (seeds, rows), each a product; consecutive seeds that
    run the same rows share one. With no ``row_seeds``: one multirun of every seed and row."""
    groups: list[tuple[list[int], list[str]]] = []
    for row, seed in runs_of(spec):
        if groups and groups[-1][0][-1] == seed:
            groups[-1][1].append(row)
        else:
            groups.append(([seed], [row]))
    merged: list[tuple[list[int], list[str]]] = []
    for seeds, rows in groups:
        if merged and merged[-1][1] == rows:
            merged[-1][0].extend(seeds)
        else:
            merged.append((seeds, rows))
    return merged


def _value(v) -> str:
    """A value as a Hydra override writes it."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def train_command(spec: DictConfig, seeds: Sequence[int] | None = None, rows: Sequence[str] | None = None) -> list[str]:
    """A flamingo-train multirun (by default every seed of ``seeds`` and every row): seeds outermost (a partial
    sweep holds every row), then rows. :func:`multiruns` gives the (seeds, rows) of each when rows differ."""
    seeds = seeds_of(spec) if seeds is None else seeds
    rows = spec.rows if rows is None else rows
    return [
        str(BIN / "flamingo-train"), "-m",
        "seed=" + ",".join(map(str, seeds)),
        "experiment=" + ",".join(rows),
        f"scale={spec.scale}",
        f"hydra/launcher={spec.launcher}",
        f"hydra.sweep.dir={spec.out}",
        f"hydra.sweep.subdir={RUN_SUBDIR}",
        f"logger.group={spec.group}",
        "run_name=${experiment}-s${seed}",
        f"force={_value(spec.force)}",
        *([f"hydra.launcher.n_jobs={int(spec.jobs)}"] if spec.launcher == "local" and spec.get("jobs") else []),
        # runs side by side would interleave their progress bars: the sweep prints a line per finished run
        *(["trainer.enable_progress_bar=false"] if spec.launcher == "local" and int(spec.get("jobs") or 1) > 1 else []),
        *map(str, spec.overrides),
    ]


def _job_overrides(spec: DictConfig) -> list[str]:
    """The overrides every run of the sweep shares, for compose() (no hydra.* settings)."""
    extra = [o for o in map(str, spec.overrides) if not o.lstrip("+~").startswith("hydra")]
    return [f"scale={spec.scale}", *extra]


def check_world(root: Path, world: str, scale: str = "embedded", key: str = "data.root",
                worlds: str = "worlds") -> None:
    """Raise if ``root`` holds a world written with other settings than ``conf/world/<world>.yaml`` (the
    sweep would train on data it does not name), or a world.json it cannot read. Imported data (a manifest
    without a world config) passes. ``key`` and ``worlds`` name the setting and the sweep's map in messages."""
    import json
    from dataclasses import asdict

    from flamingo_lab.data.world import world_identity
    from flamingo_lab.make_data import compose_world, existing_config

    path = root / "world.json"
    rewrite = f"`flamingo-data world={world} out_dir={root}`"
    as_is = f"or train on it as it is with `{worlds}.{scale}=null` (or by naming it: {key}={root})"
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): rewrite the world with {rewrite}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds no world manifest (a JSON {type(manifest).__name__}): rewrite it with {rewrite}")
    if "config" not in manifest:
        return
    have = existing_config(root)
    if have is None:
        raise ValueError(
            f"{key}={root} holds a world this version cannot read (format {manifest.get('format')!r}): "
            f"rewrite it with {rewrite}"
        )
    want = asdict(compose_world(world))
    same_have, same_want = world_identity(have), world_identity(want)
    differ = sorted(k for k in set(same_have) | set(same_want) if same_have.get(k) != same_want.get(k))
    if differ:
        shown = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} in the config" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ValueError(
            f"{key}={root} holds a world written with other settings than the sweep's world {world!r} "
            f"(conf/world/{world}.yaml): {shown}{more}. Rewrite it with {rewrite} (the runs made on the old "
            f"world then train again), {as_is}"
        )


def _ensure_one(spec: DictConfig, env: dict, root: Path, key: str, worlds: str) -> Path:
    world = (spec.get(worlds) or {}).get(str(spec.scale))
    named = any(str(o).lstrip("+").startswith(f"{key}=") for o in spec.overrides)
    if (root / "world.json").is_file():
        if world is not None and not named:  # a folder given by name is trained on as it is
            check_world(root, str(world), str(spec.scale), key, worlds)
        return root
    if world is None:
        raise FileNotFoundError(
            f"no world at {key}={root} (world.json missing) and the sweep names none to write for "
            f"scale={spec.scale}: give {key}=<a world or imported data>, or add {worlds}.{spec.scale}"
        )
    print(f"[flamingo-sweep] writing the {world!r} world at {root}", flush=True)
    subprocess.run([str(BIN / "flamingo-data"), f"world={world}", f"out_dir={root}"], env=env, check=True)
    return root


def ensure_world(spec: DictConfig, env: dict) -> Path:
    """The runs' data.root; writes it with flamingo-data (``worlds[scale]``) when it has no world.json, and
    refuses (:func:`check_world`) one written with other settings than ``worlds[scale]``, unless the sweep
    was given ``data.root=`` by name. The same for the pretraining stages' world, ``pretrain.data_root``
    (``pretrain_worlds[scale]``), where the scale gives them one of their own."""
    from flamingo_lab.config import compose

    cfg = compose(_job_overrides(spec))
    root = _ensure_one(spec, env, Path(cfg.data.root), "data.root", "worlds")
    pretrain_root = cfg.pretrain.get("data_root") if "pretrain" in cfg else None
    if pretrain_root and Path(pretrain_root).resolve() != root.resolve():
        _ensure_one(spec, env, Path(pretrain_root), "pretrain.data_root", "pretrain_worlds")
    return root


def run_status(spec: DictConfig) -> dict[tuple[str, int], dict]:
    """Per (row, seed) of the sweep: status (complete | failed | missing | unknown: no status) and error."""
    out = {}
    for row, seed in runs_of(spec):
        path = Path(spec.out) / row / f"seed{seed}" / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            results = {"status": "missing"}
        # no status: not a training run's results (flamingo-eval writes none), never counted complete
        out[row, seed] = {"status": results.get("status", "unknown"), "error": results.get("error"),
                          "path": str(path)}
    return out


def job_overrides(spec: DictConfig, row: str, seed: int) -> list[str]:
    """The overrides the multirun gives run (row, seed), less Hydra's own settings: compose() of them gives
    the config that run computes, hence its config key."""
    shared = [o for o in train_command(spec)[4:] if not o.lstrip("+~").startswith("hydra")]
    return [f"seed={seed}", f"experiment={row}", *shared]


def runs_to_train(spec: DictConfig) -> list[tuple[str, int]]:
    """The (row, seed) runs the multirun will train: those without a results.json that is complete for the
    config the sweep gives them now (a run complete for an older config is trained again); with ``force``,
    every run."""
    if spec.get("force"):
        return list(run_status(spec))
    return [pair for pair, v in run_status(spec).items() if v["status"] != "complete" or not _current(spec, *pair, v)]


def _holds_checkpoint(run_dir: Path) -> bool:
    from flamingo_lab.training.callbacks import InterruptCheckpoint

    return (any((run_dir / "checkpoints" / name).is_file() for name in ("last.ckpt", InterruptCheckpoint.FILENAME))
            or any(run_dir.glob("hpc_ckpt_*.ckpt")))


def _current(spec: DictConfig, row: str, seed: int, status: dict) -> bool:
    """Whether run (row, seed)'s complete results.json is for the config the sweep gives it now."""
    from flamingo_lab.config import compose
    from flamingo_lab.training.run import completed, config_key

    try:
        key = config_key(compose(job_overrides(spec, row, seed)))
    except Exception:  # noqa: BLE001 -- a config that does not compose fails in its run, which is to do
        return False
    return completed(Path(status["path"]).parent, key) is not None


def table_paths(spec: DictConfig) -> tuple[list[str], list[str]]:
    """(the results.json files Table 3 is made of, the complete ones left out because their config is not the
    one the sweep gives them now). Only the sweep's own rows and seeds are read: a folder that still holds
    other seeds, rows or stray results.json files (an earlier sweep with more seeds, a flamingo-eval run) does
    not change the table."""
    paths, stale = [], []
    for pair, v in run_status(spec).items():
        if v["status"] == "missing":
            continue
        if v["status"] == "complete" and not _current(spec, *pair, v):
            stale.append(v["path"])
            continue
        paths.append(v["path"])
    return paths, stale


def describe_runs(spec: DictConfig) -> str:
    """'19 rows x 3 seeds', or with ``row_seeds`` e.g. '19 rows x 3 seeds (baseline: 5)'."""
    base = f"{len(spec.rows)} rows x {len(seeds_of(spec))} seeds"
    other = {row: seeds_of(spec, row) for row in spec.rows if seeds_of(spec, row) != seeds_of(spec)}
    if not other:
        return base
    def count(seeds: list[int]) -> str:
        return str(len(seeds)) if seeds == list(range(len(seeds))) else str(seeds)

    return base + " (" + ", ".join(f"{row}: {count(seeds)}" for row, seeds in other.items()) + ")"


class Sequential:
    """The multiruns, one after the other in a thread, seen as one process: ``wait(timeout)`` and
    ``returncode`` (the first non-zero exit, else 0) as :class:`subprocess.Popen` has them. A multirun that
    fails does not stop the next (its runs are recorded as failed); one stopped by a signal (exit 130 or 143:
    Ctrl-C, SIGTERM) or :meth:`stop` (the sweep interrupted) starts no further one."""

    def __init__(self, commands: Sequence[Sequence[str]], env: dict):
        import threading

        self.returncode: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(list(commands), env), daemon=True)
        self._thread.start()

    def _run(self, commands, env) -> None:
        code = 0
        for command in commands:
            if self._stopped.is_set():
                code = code or 130
                break
            rc = subprocess.run(command, env=env).returncode
            code = code or rc
            if rc in (130, 143, -2, -15):  # a run stopped by Ctrl-C or SIGTERM: the sweep stops, as it was asked
                break
        self.returncode = code

    def stop(self) -> None:
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("flamingo-train -m", timeout)
        return self.returncode


def _clock(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {int(seconds % 60):02d} s"


def report_progress(spec: DictConfig, proc: subprocess.Popen, started: float, every: float = 10.0,
                    clock=time.perf_counter) -> None:
    """While the multirun runs: a line each time runs finish (complete or failed), with the elapsed time
    and an estimate of what is left. Runs already complete for the config the sweep gives them are skipped
    and not counted; a run complete for an older config is counted, as it trains again."""
    total = len(runs_of(spec))
    wall_start = time.time()

    def finished(since: float) -> int:
        n = 0
        for v in run_status(spec).values():
            if v["status"] in ("complete", "failed"):
                n += Path(v["path"]).stat().st_mtime >= since
        return n

    pending = runs_to_train(spec)  # failed ones and those of an older config run again
    todo, status = len(pending), run_status(spec)
    held = sum(_holds_checkpoint(Path(status[pair]["path"]).parent) for pair in pending if pair in status)
    resumable = (f" ({held} hold a checkpoint from an earlier attempt: each continues from it if it was trained with "
                 f"the same config and data, resume=auto)" if held and not spec.get("force") else "")
    print(f"[flamingo-sweep] {todo} of {total} runs to train{resumable}; {total - todo} complete for this config are "
          f"skipped", flush=True)
    last, running, first = 0, True, None
    while running:
        try:
            proc.wait(timeout=every)
            running = False  # one last look after the multirun has exited
        except subprocess.TimeoutExpired:
            pass
        new = finished(wall_start)
        if new != last:
            elapsed = clock() - started
            if first is None:
                first = (new, elapsed)  # the rate is taken after it: the first runs also wait for pretraining
            rate = (elapsed - first[1]) / (new - first[0]) if new > first[0] else None
            eta = f", ~{_clock((todo - new) * rate)} left" if rate and new < todo else ""
            print(f"[flamingo-sweep] {new}/{todo} runs finished, {_clock(elapsed)} elapsed{eta}", flush=True)
            last = new


def render(sweep_dir: str | Path, spec: DictConfig | None = None) -> dict[str, Path]:
    """Table 3 (markdown, HTML), the tidy runs (CSV) and the plots, written into ``sweep_dir``: from the sweep
    ``spec``'s own runs (:func:`table_paths`), or without one from every results.json under ``sweep_dir``."""
    from flamingo_lab.analysis import (load_runs, load_step_times, plot_loss_curves, plot_overall, table3, to_html,
                                       to_markdown)

    sweep_dir = Path(sweep_dir)
    paths = None
    if spec is not None:
        paths, stale = table_paths(spec)
        for path in stale:
            print(f"[flamingo-sweep] left out of the table: {path} is complete for another config or world than "
                  "the sweep's now (run the sweep to train it again)", flush=True)
        others = len(set(map(str, sweep_dir.rglob("results.json"))) - set(paths) - set(stale))
        if others:
            print(f"[flamingo-sweep] {others} results.json under {sweep_dir} outside this sweep's rows and seeds "
                  "left out of the table", flush=True)
        if not paths:
            raise FileNotFoundError(f"no results of this sweep's rows and seeds under {sweep_dir}")
    runs = load_runs(sweep_dir, paths)
    step_times = load_step_times(sweep_dir)  # benchmarks/row_step_times.py's runs alone, when it left them here
    print(f"[flamingo-sweep] step column: " + (f"{sweep_dir}/step_times.json (each row alone)" if step_times else
          "the runs' own times, taken side by side (benchmarks/row_step_times.py --out "
          f"{sweep_dir}/step_times.md measures each row alone)"), flush=True)
    table = table3(runs, step_times=step_times)
    written = {"runs": sweep_dir / "runs.csv", "markdown": sweep_dir / "table3.md", "html": sweep_dir / "table3.html"}
    runs.to_csv(written["runs"], index=False)
    written["markdown"].write_text(to_markdown(table))
    written["html"].write_text(to_html(table))
    if len(table):
        written["overall_plot"] = plot_overall(table, sweep_dir / "overall.png")
        written["loss_plot"] = plot_loss_curves(runs, sweep_dir / "loss_curves.png")
    if ((runs["experiment"] == "baseline") & (runs["status"] == "complete")).any():
        from flamingo_lab.analysis import breakdown_markdown, breakdown_table, plot_eval_curve

        written["baseline"] = sweep_dir / "baseline.md"  # per question type, chance, the text control
        written["baseline"].write_text(breakdown_markdown(breakdown_table(runs)))
        curve = plot_eval_curve(runs, sweep_dir / "eval_curve.png")
        if curve is not None:
            written["eval_curve_plot"] = curve
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    spec = load_sweep(argv[0], argv[1:])
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(spec.threads))
    n = len(runs_of(spec))
    print(f"[flamingo-sweep] {spec.name}: {describe_runs(spec)} = {n} runs, "
          f"scale={spec.scale}, launcher={spec.launcher} -> {spec.out}", flush=True)

    if str(spec.render) != "only":
        ensure_world(spec, env)
        commands = [train_command(spec, seeds, rows) for seeds, rows in multiruns(spec)]
        for command in commands:
            print("[flamingo-sweep] " + " ".join(f"'{c}'" if "$" in c or " " in c else c for c in command), flush=True)
        started = time.perf_counter()
        proc = Sequential(commands, env)
        try:
            report_progress(spec, proc, started)
        except KeyboardInterrupt:  # the running multirun gets the signal too; start no further one
            proc.stop()
            raise
        print(f"[flamingo-sweep] multirun{'s' if len(commands) > 1 else ''} exited {proc.returncode} after "
              f"{time.perf_counter() - started:.0f} s", flush=True)

    status = run_status(spec)
    counts = {s: sum(v["status"] == s for v in status.values()) for s in ("complete", "failed", "missing")}
    print(f"[flamingo-sweep] {counts['complete']}/{n} complete, {counts['failed']} failed, "
          f"{counts['missing']} missing", flush=True)
    for (row, seed), v in status.items():
        if v["status"] != "complete":
            print(f"  {row}/seed{seed}: {v['status']}" + (f": {v['error']}" if v["error"] else ""), flush=True)
    if spec.render and counts["complete"] + counts["failed"]:
        for what, path in render(spec.out, spec).items():
            print(f"[flamingo-sweep] {what}: {path}", flush=True)
        table = Path(spec.out) / "table3.md"
        print(table.read_text(), flush=True)
    return 0 if counts["complete"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
