"""LightningDataModule over the WebDataset shards of a world folder (see `flamingo-data`) or real shards.

Training: one infinite, seeded loader per source (its own batch size, sequence length, image slots
and frames), combined as ``data.optimisation`` says (flamingo_lab.data.mixture): ``accumulate``
gives the training step ``{source: batch}`` for every source at every step, ``round_robin`` one
source per step in turn. Validation: the sources' finite loaders interleaved batch by batch
(``data.val_batches`` batches in all).

Skipped samples are counted per source and per reason from the batches (the counts made in
DataLoader workers travel with them), in training and in each validation pass:
:meth:`FlamingoDataModule.skip_counts` returns them for results.json, and a training source that skips
more than ``data.max_skip_share`` of its samples stops the run (checked on the delivered batches here,
and in the stream itself while it delivers nothing; a source with no usable sample stops it too).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
import torch
from torch.utils.data import DataLoader, default_collate

from flamingo_lab.data.mixture import RoundRobin, SkipTally, optimisation, source_specs
from flamingo_lab.data.shards import load_world, make_source_stream
from flamingo_lab.models import load_tokenizer

log = logging.getLogger(__name__)


def worker_context():
    """The start method of the loader workers, named rather than inherited: inside a sweep's joblib (loky)
    worker the inherited default is loky's own, whose processes DataLoader cannot start ("'Process' object
    has no attribute 'env'"). fork where the platform has it (Linux's default), else spawn."""
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _ignore_sigterm(worker_id: int) -> None:
    """A loader worker ignores SIGTERM: a preemption signals every process of the job (SLURM, ``kill -- -PGID``),
    and a worker that PyTorch's own handler ended made the training process raise "DataLoader worker ... is killed
    by signal: Terminated" wherever it stood, so the run failed rather than stopping between batches with its
    state written (``StopTogether``). The worker still stops when its loader shuts it down or its parent dies."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Validation:
    """The validation pass: one full batch of each source in turn until all are exhausted (one iterable, so
    ``val/loss`` is a single metric over every source's batches), calling ``on_start`` each time a pass begins;
    a short last batch (:class:`_FullBatchesOrSkips`) goes to ``on_partial`` instead of the pass.

    With several processes, ``agree(have)`` (a collective call, made on every rank for each source in turn)
    says whether every rank has that source's next batch; where one has not, the source ends on every rank.
    The ranks read their own part of the validation shards, which may give them different numbers of batches:
    under FSDP every forward gathers parameters from all ranks, so a rank with one batch more waited for the
    others for ever, and under DDP a rank with no batch of a source never logged its metric, which the others
    waited to sync. Each rank now validates the batches of each source that every rank has."""

    def __init__(self, loaders: dict[str, Iterable], on_start: Callable[[], None],
                 on_partial: Callable[[dict], None], agree: Callable[[bool], bool] | None = None):
        self.loaders, self.on_start, self.on_partial, self.agree = loaders, on_start, on_partial, agree

    _TURN_TAKEN = object()

    def _next(self, it: Iterator) -> Any:
        """The source's item for this turn: a full batch, or None at its end. Alone, a short batch takes the turn
        (``_TURN_TAKEN``), as in the pass before the ranks agreed (with loader workers a worker's short last batch
        can come before other workers' full ones); with several processes the next full batch is taken."""
        for batch in it:
            if not (isinstance(batch, dict) and "partial" in batch):
                return batch
            self.on_partial(batch)
            if self.agree is None:
                return self._TURN_TAKEN
        return None

    def __iter__(self) -> Iterator:  # a generator: Lightning calls iter() once just to check, and never steps it
        self.on_start()
        its = {n: iter(dl) for n, dl in self.loaders.items()}
        while its:
            for name in list(its):
                batch = self._next(its[name])
                if batch is self._TURN_TAKEN:
                    continue
                if self.agree is not None and not self.agree(batch is not None):
                    batch = None  # some rank has no more of this source
                if batch is None:
                    del its[name]
                    continue
                yield batch


class _FullBatchesOrSkips:
    """``collate_fn`` of the finite (validation) loaders, which keep their last batch: a full batch is collated
    as usual; a last batch short of ``batch_size`` (``drop_last`` would drop it, with the skip counts its samples
    carry) becomes ``{"partial": n, "source": [source], "skipped": (n, R)}``: its samples are still left out
    (fixed shapes), and the counts still reach the tally."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, samples: list[dict]):
        if len(samples) == self.batch_size:
            return default_collate(samples)
        return {"partial": len(samples), "source": [samples[0].get("source", "data")],
                "skipped": torch.stack([s["skipped"] for s in samples])}


class _FastForward:
    """``loader`` less its first ``n`` batches: those a resumed run has already trained on (a generator, so
    that Lightning's iter() to check the loader reads nothing).

    The slow way to resume, kept for what the quick one (:attr:`~flamingo_lab.data.shards.SourceStream.resume_from`)
    cannot do: every batch passed over is decoded and collated again (hours at step 100k). ``note`` sees each
    one, so that the positions they carry are kept and the next resume can be the quick one.
    """

    def __init__(self, loader: Iterable, n: int, note: Callable[[dict], None] | None = None):
        self.loader, self.n, self.note = loader, n, note

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        for batch in itertools.islice(it, self.n):
            if self.note is not None:
                self.note(batch)
        yield from it


class _Rotated:
    """``loader``'s batches with each block of ``workers`` rotated to start at its ``first``-th (a generator).

    A DataLoader over an iterable dataset takes its batches from workers 0, 1, ..., W-1 in turn, from worker 0
    on every new iterator. After n batches the uninterrupted run's next one comes from worker n mod W; a resumed
    loader whose workers' streams stand where they stopped yields the same batches, each block of W in the order
    0..W-1, so each block is turned to start at that worker. (Meant for infinite loaders: a short last block is
    turned the same way.)
    """

    def __init__(self, loader: Iterable, workers: int, first: int):
        self.loader, self.workers, self.first = loader, workers, first

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        while block := list(itertools.islice(it, self.workers)):
            yield from block[self.first:] + block[:self.first]


def _tally_state(t: SkipTally) -> dict:
    return {"seen": dict(t.seen), "skipped": {s: dict(c) for s, c in t.skipped.items()}}


class FlamingoDataModule(pl.LightningDataModule):
    """Per-source training loaders (infinite, seeded) and a finite validation pass, all at fixed shapes.

    The training batches delivered per source travel in the checkpoint (with the skip counts), so a resumed
    run continues each stream where it stopped: its streams start from the same seeds and pass over what
    was already trained on (round robin resumes at the source whose turn it was), and it trains on the
    batches the uninterrupted run would have.

    Passing over is cheap: the checkpoint also keeps, per source and per DataLoader worker, the position of
    that worker's stream after its last delivered batch (``stream_pos``, raw samples taken from its shuffle
    buffer), and each resumed stream passes over that many raw samples without decoding them; the loader's
    batches are then put back in the uninterrupted run's worker order (:class:`_Rotated`). Where positions
    cannot be used (a checkpoint written before they were kept, or by another number of processes: each rank's
    positions are gathered into the checkpoint, which Lightning writes from rank 0), the run reads through the
    batches it already trained on instead (:class:`_FastForward`: the same batches, decoded again) and logs why.
    So it does under another ``data.num_workers`` (a resume only
    ``force=true`` allows), where the shards split over the workers otherwise: what it reads through is then not
    what was trained on, and the run is not the uninterrupted one.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.data = cfg["data"]
        self.specs = source_specs(self.data)
        self.mode = optimisation(self.data)
        self.tokenizer = None
        self.world = None
        self.tally = SkipTally(self.specs, self.data.get("max_skip_share"), int(self.data.get("skip_min_samples", 200)))
        self.val_tally = SkipTally(self.specs)  # the latest validation pass (counted, never stops the run)
        self.val_passes = 0
        self.delivered: Counter = Counter()  # training batches delivered per source (the streams' positions)
        # per source, per loader worker: the stream_pos of its last delivered training batch (see the class)
        self.positions: dict[str, dict[int, int]] = {}
        self.saved_layout: dict[str, int] | None = None  # num_workers, world_size: what the restored positions hold for
        self._before_batch: dict[str, Any] | None = None  # the state before the training batch in its step
        self._processed_at = 0  # Lightning's processed-batch count when that batch arrived
        self._restored = False

    # -- what other parts read --------------------------------------------------------------

    @property
    def sources(self) -> list[str]:
        return list(self.specs)

    @property
    def updates_per_cycle(self) -> int:
        """Optimiser updates that see every source once: 1 (accumulate) or S (round robin)."""
        return len(self.specs) if self.mode == "round_robin" else 1

    def skip_counts(self) -> dict:
        """Samples delivered and skipped, per source and per reason (this process), for results.json: training's
        ``{"per_source": {src: {"seen", "skipped": {reason: n}, "skipped_total", "share"}}, "skipped_total",
        "seen_total", "max_share"}`` and under ``"val"`` the same for the latest validation pass, with
        ``"passes"`` (validation passes run). Skips reach this process with the samples: a finite stream's last
        sample also carries those after it, and a validation loader's short last batch (not evaluated) its counts."""
        val = self.val_tally.as_dict()
        del val["max_share"]
        return {**self.tally.as_dict(), "val": {**val, "passes": self.val_passes}}

    # -- set-up -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.world is None:
            self.world = load_world(self.data["root"])
            self._check_video_pages()
            self.tokenizer = load_tokenizer(self.cfg["model"]["lm"])

    def _check_video_pages(self) -> None:
        """An embedded world of video pages (``world.vtp_clips`` N > 1) needs N image slots in the video source:
        the reader cuts a document before its first image without a slot, so each page would train as its first
        clip alone, without a word."""
        clips = int((self.world.get("config") or {}).get("vtp_clips", 1))
        spec = self.specs.get("vtp")
        if spec is None or clips <= int(spec["max_images"]):
            return
        raise ValueError(
            f"the world at {self.data['root']} writes video pages of {clips} clips (world.vtp_clips={clips}), but "
            f"data.sources.vtp.max_images={spec['max_images']} gives a sample {spec['max_images']} image slot(s), so "
            f"every page would be cut to its first clip(s). Set data.sources.vtp.max_images={clips} and "
            f"data.sources.vtp.seq_len={clips * int(spec['seq_len'])} (the pairs' length per clip; and "
            f"data.sources.vtp.batch_ratio / {clips} for the same clips a step), or write the world with "
            f"world.vtp_clips=1"
        )

    def _shards(self, split: str) -> dict[str, list[str]]:
        available = self.world.get("shards", {}).get(split, {})
        unknown = sorted(set(self.specs) - set(available))
        if unknown:
            raise ValueError(
                f"data.sources names {unknown}, which the world at {self.data['root']} does not have in its "
                f"{split} split; valid sources: {sorted(available)}"
            )
        return {s: list(available[s]) for s in self.specs}

    def _stream(self, source: str, urls: list[str], train: bool, seed: int = 0):
        spec = self.specs[source]
        shape = {k: spec[k] for k in ("seq_len", "max_images", "frames", "frame_stride", "max_doc_images")}
        # training streams also check the skip share themselves, for a source that delivers nothing
        guard = {"max_skip_share": self.tally.max_share, "skip_min_samples": self.tally.min_samples} if train else {}
        return make_source_stream(urls, self.tokenizer, source=source, train=train, seed=seed,
                                  image_size=int(self.cfg["model"]["vision"]["image_size"]),
                                  shuffle_buffer=int(self.data.get("shuffle_buffer", 500)), **guard, **shape)

    def _loader(self, dataset, batch_size: int, persistent: bool, finite: bool = False) -> DataLoader:
        workers = int(self.data["num_workers"])
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            persistent_workers=workers > 0 and persistent,
            # fixed batch shape: a finite loader's short last batch carries only its skip counts
            drop_last=not finite,
            collate_fn=_FullBatchesOrSkips(batch_size) if finite else None,
            multiprocessing_context=worker_context() if workers > 0 else None,
            worker_init_fn=_ignore_sigterm if workers > 0 else None,
        )

    def train_loaders(self) -> dict[str, DataLoader]:
        """One infinite loader per source, seeded by (seed, source)."""
        shards = self._shards("train")
        base = int(self.cfg["seed"]) * 1_000_003
        return {
            s: self._loader(self._stream(s, shards[s], True, seed=base + 7919 * i), self.specs[s]["batch_size"], True)
            for i, s in enumerate(self.specs)
        }

    def _consumed(self) -> dict[str, int]:
        """Training batches each source has delivered before this fit: the checkpoint's count, or for a
        checkpoint written before the count was kept, what its step implies."""
        if self._restored or self.trainer is None or not self.trainer.global_step:
            return {s: int(self.delivered[s]) for s in self.specs}
        batches = int(self.trainer.global_step) * int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        if self.mode == "round_robin":
            n = len(self.specs)
            return {s: (batches - i + n - 1) // n for i, s in enumerate(self.specs)}
        return {s: batches for s in self.specs}

    def _world_size(self) -> int:
        return int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1

    def _rank(self) -> int:
        return int(getattr(self.trainer, "global_rank", 0) or 0) if self.trainer is not None else 0

    def _positions_by_rank(self, positions: dict[str, dict[int, int]]) -> dict[int, dict[str, dict[int, int]]]:
        """Every rank's stream positions. Each rank reads its own part of the shards, so each has its own, and
        Lightning writes rank 0's state alone: they are gathered from every rank (``state_dict`` runs on all of
        them when a checkpoint is written) as an (S, W) tensor per rank, -1 where a worker has delivered nothing
        yet, so that nothing is pickled."""
        world = self._world_size()
        if world == 1:
            return {self._rank(): positions}
        names, workers = list(self.specs), max(1, int(self.data["num_workers"]))
        mine = torch.full((len(names), workers), -1, dtype=torch.long, device=self.trainer.strategy.root_device)
        for i, s in enumerate(names):
            for w, n in positions.get(s, {}).items():
                mine[i, w] = n
        every = self.trainer.strategy.all_gather(mine).reshape(world, len(names), workers).cpu()  # (world, S, W)
        return {r: {s: {w: int(every[r, i, w]) for w in range(workers) if every[r, i, w] >= 0}
                    for i, s in enumerate(names) if (every[r, i] >= 0).any()} for r in range(world)}

    def _why_not_skip(self, consumed: dict[str, int]) -> str | None:
        """Why the streams' positions cannot resume this run (None: they can)."""
        workers = int(self.data["num_workers"])
        if self.saved_layout is None:
            return "the checkpoint holds no stream positions (it was written before they were kept)"
        if self.saved_layout.get("world_size", 1) != self._world_size():
            return (f"the checkpoint was written by {self.saved_layout.get('world_size', 1)} process(es) and this run "
                    f"has {self._world_size()}")
        if self.saved_layout.get("num_workers") != workers:
            return (f"the checkpoint's streams were read by data.num_workers={self.saved_layout.get('num_workers')} "
                    f"and this run has {workers}")
        for s, n in consumed.items():  # worker w has delivered a batch iff w < n (batches come from 0, 1, ... in turn)
            missing = sorted(set(range(min(n, max(1, workers)))) - set(self.positions.get(s, {})))
            if missing:
                return f"the checkpoint has no position for source {s!r} in loader worker(s) {missing}"
        return None

    def train_dataloader(self):
        consumed = self._consumed()
        self.delivered = Counter(consumed)
        loaders = self.train_loaders()
        self._train_dataloaders = list(loaders.values())  # teardown() stops their workers
        why = self._why_not_skip(consumed) if any(consumed.values()) else None
        if why is None:
            workers = max(1, int(self.data["num_workers"]))
            for s, dl in loaders.items():
                if consumed[s]:
                    dl.dataset.resume_from = dict(self.positions[s])  # before iter(): workers copy the dataset
                    if consumed[s] % workers:
                        loaders[s] = _Rotated(dl, workers, consumed[s] % workers)
        else:
            log.warning("resume: %s, so the loaders read through the %d batches already trained on (decoded again; "
                        "slow for a long run)", why, sum(consumed.values()))
            self.positions = {}  # made under another layout: the batches read through note the new ones
            loaders = {s: _FastForward(dl, consumed[s], lambda b, s=s: self._note_position(s, b)) if consumed[s] else dl
                       for s, dl in loaders.items()}
        if self.mode == "round_robin":  # in turn from the source whose turn it is
            names = list(self.specs)
            first = sum(consumed.values()) % len(names)
            return RoundRobin({s: loaders[s] for s in names[first:] + names[:first]})
        return CombinedLoader(loaders, mode="max_size_cycle")  # all infinite: one batch of each per step

    def teardown(self, stage: str | None = None) -> None:
        """Stop the training loaders' worker processes at the end of the run. Lightning stops those of the loaders
        it can see, but the wrappers here (round robin, rotation, fast-forward) hide them, and their persistent
        workers lived on until garbage collection, holding their prefetched batches (a process that trains run
        after run, as a sweep's worker or the test suite, gathered them and then waited minutes to stop them)."""
        from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

        for loader in getattr(self, "_train_dataloaders", []):
            _shutdown_workers_and_reset_iterator(loader)
        self._train_dataloaders = []

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The streams' positions and the skip counts, so that a resumed run continues both. Positions per
        worker hold only under the same ``num_workers`` and number of processes, so the layout they were made
        under goes with them; every rank's are gathered (:meth:`_positions_by_rank`)."""
        trained = self._trained_state()
        if self._before_batch is not None and self.trainer is not None and self.trainer.training \
                and self._processed() <= self._processed_at:
            # written while a batch trains (Lightning's SLURM requeue saves from a signal handler, wherever the step
            # stands): global_step does not count that batch yet, so neither may the streams, or the resumed run
            # would leave it out
            trained = self._before_batch
        layout = {"num_workers": int(self.data["num_workers"]), "world_size": self._world_size(), "rank": self._rank()}
        by_rank = self._positions_by_rank(trained["positions"])
        return {"delivered": trained["delivered"], "tally": trained["tally"], "val_tally": _tally_state(self.val_tally),
                "val_passes": self.val_passes, "positions": by_rank.get(self._rank(), {}),
                "positions_by_rank": by_rank, "layout": layout}

    def _trained_state(self) -> dict[str, Any]:
        """Where the training streams stand and what they skipped, as plain copies."""
        return {"delivered": dict(self.delivered), "tally": _tally_state(self.tally),
                "positions": {s: dict(p) for s, p in self.positions.items()}}

    def _processed(self) -> int:
        """Training batches Lightning has run through their step (its own progress count)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def restore(t: SkipTally, d: dict) -> None:
            t.seen = Counter({**{s: 0 for s in self.specs}, **d.get("seen", {})})
            t.skipped = {**{s: Counter() for s in self.specs}, **{s: Counter(c) for s, c in d.get("skipped", {}).items()}}

        self.delivered = Counter(state_dict.get("delivered", {}))
        restore(self.tally, state_dict.get("tally", {}))
        restore(self.val_tally, state_dict.get("val_tally", {}))
        self.val_passes = int(state_dict.get("val_passes", 0))
        positions = state_dict.get("positions", {})
        if "positions_by_rank" in state_dict:  # this rank's own (a checkpoint of one process holds rank 0's only)
            positions = state_dict["positions_by_rank"].get(self._rank(), {})
        self.positions = {s: {int(w): int(n) for w, n in p.items()} for s, p in positions.items()}
        self.saved_layout = state_dict.get("layout") if "positions" in state_dict else None
        self._restored = True

    def val_dataloader(self):
        shards = self._shards("val")
        loaders = {s: self._loader(self._stream(s, shards[s], False), self.specs[s]["batch_size"], False, finite=True)
                   for s in self.specs}
        return _Validation(loaders, self._start_validation_pass,
                           lambda short: self.val_tally.add_skips(short["source"][0], short["skipped"]),
                           self._every_rank_has if self._world_size() > 1 else None)

    def _every_rank_has(self, have: bool) -> bool:
        """Whether every rank has its next validation batch of the source in turn (all ranks call this together)."""
        import torch.distributed as dist

        flag = torch.tensor([int(have)], device=self.trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if have and not flag.item():
            log.warning("validation: this rank (%d) has more batches of a source than another rank; each rank "
                        "validates the batches of each source that every rank has", self._rank())
        return bool(flag.item())

    def _start_validation_pass(self) -> None:
        self.val_tally = SkipTally(self.specs)
        self.val_passes += 1

    # -- skip accounting and stream positions ------------------------------------------------

    def _note_position(self, source: str, batch: dict, keep: bool = True) -> None:
        """Take the stream position out of a training ``batch`` and (``keep``) note it: where the stream of the
        worker that made the batch (all of it: a batch comes from one worker) stands after its last sample."""
        pos, worker = batch.pop("stream_pos", None), batch.pop("stream_worker", None)
        if keep and pos is not None and worker is not None:
            self.positions.setdefault(source, {})[int(worker[-1])] = int(pos.max())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        tally = self.tally if training else self.val_tally
        if isinstance(batch, dict) and "input_ids" not in batch:  # {source: batch}
            if training:  # what a checkpoint holds until this batch has been through its step (state_dict)
                self._before_batch, self._processed_at = self._trained_state(), self._processed()
            for source, b in batch.items():
                tally.add(source, b)
                if training:
                    self.delivered[source] += 1
                self._note_position(source, b, keep=training)
            if training:
                self.tally.check()
        elif isinstance(batch, dict):  # one source's batch (validation interleaves them)
            self._note_position("", batch, keep=False)  # validation streams start afresh each pass
            source = batch.get("source")
            if isinstance(source, (list, tuple)) and source:
                tally.add(source[0], batch)
            else:
                batch.pop("skipped", None)
        return batch
