"""Real-format readers, skip accounting, rank x worker splitting, the per-source mixture and Table 3's data rows."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import signal
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from flamingo_lab.data.mixture import RoundRobin, SkipTally, loss_scale, source_specs
from flamingo_lab.data.shards import (
    SKIP_REASONS,
    load_world,
    load_world_tokenizer,
    make_eval_dataset,
    make_source_stream,
)


@pytest.fixture(scope="module")
def tok(tiny_world_dir):
    return load_world_tokenizer(tiny_world_dir)


def _jpg(colour=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write({k: (v if isinstance(v, bytes) or k == "__key__" else json.dumps(v).encode() if not isinstance(v, str)
                         else v.encode()) for k, v in s.items()})
    return str(path)


def _keys(ds):
    return [x["__key__"] for x in ds]


class _Spins(BaseException):
    """Not an Exception: the pipeline's skip handlers must not swallow it."""


@contextlib.contextmanager
def _fails_within(seconds: float):
    """A stream that spins for ever fails the test (SIGALRM) instead of hanging the run."""
    def stop(signum, frame):
        raise _Spins(f"no sample and no error within {seconds} s: the stream spins")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _pairs(n: int, prefix: str = "p") -> list[dict]:
    return [{"__key__": f"{prefix}{i:03d}", "jpg": _jpg(), "txt": f"a red square number {i}."} for i in range(n)]


# --- real formats ------------------------------------------------------------------------------


def test_img2dataset_mmc4_and_video_shards_read(tmp_path, tok):
    pairs = _write(tmp_path / "pairs.tar", [
        {"__key__": f"{i:09d}", "jpg": _jpg(), "txt": "a red square.", "json": {"url": "http://x", "width": 48}}
        for i in range(3)])
    b64 = base64.b64encode(_jpg((30, 30, 200))).decode()
    docs = _write(tmp_path / "docs.tar", [
        {"__key__": "doc0", "json": {"text_list": ["a page.", "here is a red square.", "a blue one."],
                                     "image_info": [{"image_name": "abc.jpg", "matched_text_index": 1, "matched_sim": 0.3},
                                                    {"image_name": "def.jpg", "matched_text_index": 2}]},
         "abc.jpg": _jpg()},
        {"__key__": "doc1", "json": {"text_list": ["one image inline."],
                                     "image_info": [{"image_name": "x.jpg", "matched_text_index": 0, "image_base64": b64}]}},
    ])
    # doc0 names def.jpg, which is not in the sample: skipped (bad_layout); doc1 carries its image inline (MMC4 base64)
    video = _write(tmp_path / "video.tar", [
        {"__key__": "v0", **{f"{f}.jpg": _jpg((40 * f, 0, 0)) for f in range(6)}, "txt": "a square turns red."},
        {"__key__": "v1", "mp4": b"\x00\x00\x00\x18ftypmp42", "txt": "an encoded clip."},
    ])
    shape = dict(seq_len=24, max_images=2, image_size=32)
    out = list(make_eval_dataset({"pairs": [pairs]}, tok, **shape))
    assert len(out) == 3 and int(out[0]["n_images"]) == 1 and out[0]["images"].shape == (2, 1, 3, 32, 32)
    ds = make_eval_dataset({"docs": [docs]}, tok, **shape)
    assert _keys(ds) == ["doc1"] and ds.skip_counts() == {"docs": {"bad_layout": 1}}
    vs = make_source_stream([video], tok, source="vtp", train=False, frames=3, frame_stride=2, **shape)
    clips = list(vs)
    assert [c["__key__"] for c in clips] == ["v0"] and dict(vs.skipped.by_reason) == {"unsupported_video": 1}
    imgs = clips[0]["images"]  # (T_img, F, C, H, W): frames 0, 2, 4 of the six
    assert imgs.shape == (2, 3, 3, 32, 32) and int(clips[0]["n_images"]) == 1
    reds = imgs[0, :, 0].mean(dim=(1, 2))
    assert reds[0] < reds[1] < reds[2] and not imgs[1].any()


def test_a_page_of_clips_gives_each_image_slot_its_clips_frames(tmp_path, tok):
    """A document whose image_info entries name their frames (frame_names: the embedded world's video pages,
    world.vtp_clips) gives per <image> a clip, sampled like a clip of its own; a bad entry is skipped and counted."""
    def page(key, info):
        return {"__key__": key, "json": {"text_list": ["a square turns red.", "a circle moves up."], "image_info": info},
                **{f"c{c}f{f}.jpg": _jpg((40 * f, 100 * c, 0)) for c in range(2) for f in range(6)}}

    clips = [{"matched_text_index": c, "frame_names": [f"c{c}f{f}.jpg" for f in range(6)]} for c in range(2)]
    shard = _write(tmp_path / "pages.tar", [
        page("good", clips),
        page("not_a_list", [{"matched_text_index": 0, "frame_names": "c0f0.jpg"}]),
        page("missing_frame", [{"matched_text_index": 0, "frame_names": ["c0f0.jpg", "c9f9.jpg"]}]),
    ])
    vs = make_source_stream([shard], tok, source="vtp", train=False, frames=3, frame_stride=2, seq_len=32,
                            max_images=2, image_size=32)
    out = list(vs)
    assert [x["__key__"] for x in out] == ["good"]
    assert dict(vs.skipped.by_reason) == {"bad_json": 1, "bad_layout": 1}
    imgs = out[0]["images"]  # (T_img, F, C, H, W): per clip its frames 0, 2, 4
    assert imgs.shape == (2, 3, 3, 32, 32) and int(out[0]["n_images"]) == 2
    for c in range(2):
        reds, greens = imgs[c, :, 0].mean(dim=(1, 2)), imgs[c, :, 1].mean(dim=(1, 2))
        assert reds[0] < reds[1] < reds[2]  # in frame order
        assert torch.allclose(greens, greens[0].expand(3), atol=0.02)
    assert imgs[1, :, 1].mean() > imgs[0, :, 1].mean() + 0.5  # each slot holds its own clip
    ids = out[0]["input_ids"].tolist()
    media, eoc = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|endofchunk|>")
    assert ids.count(media) == 2 and ids.count(eoc) == 2 and ids.index(media) < ids.index(eoc) < ids.index(media, ids.index(media) + 1)


def test_every_bad_sample_is_skipped_and_counted_by_reason(tmp_path, tok):
    good = {"jpg": _jpg(), "txt": "a red square."}
    many = {"text_list": [f"sentence {i}." for i in range(20)],
            "image_info": [{"image_name": f"{i}.jpg", "matched_text_index": i} for i in range(20)]}
    shard = _write(tmp_path / "bad.tar", [
        {"__key__": "ok0", **good},
        {"__key__": "badimg", "jpg": b"\xff\xd8garbage", "txt": "x"},
        {"__key__": "notext", "jpg": _jpg()},
        {"__key__": "emptytext", "jpg": _jpg(), "txt": "   "},
        {"__key__": "badjson", "json": b"{not json", "jpg": _jpg(), "txt": "y"},
        {"__key__": "many", "json": many, **{f"{i}.jpg": _jpg() for i in range(20)}},
        {"__key__": "ok1", **good},
    ])
    truncated = tmp_path / "truncated.tar"
    full = open(_write(tmp_path / "t.tar", [{"__key__": f"t{i}", **good} for i in range(4)]), "rb").read()
    truncated.write_bytes(full[: len(full) // 2 + 100])
    stream = make_source_stream([shard, str(truncated)], tok, source="s", train=False, seq_len=16, max_images=2,
                                image_size=32, max_doc_images=8)
    out = list(stream)
    keys = [x["__key__"] for x in out]
    assert keys[:2] == ["ok0", "ok1"] and all(k.startswith("t") for k in keys[2:])
    counts = dict(stream.skipped.by_reason)
    assert counts == {"bad_image": 1, "missing_text": 2, "bad_json": 1, "too_many_images": 1, "corrupt_tar": 1}
    # the counts travel with the samples (so they leave DataLoader workers with the batches)
    carried = torch.stack([x["skipped"] for x in out]).sum(0)
    assert {r: int(n) for r, n in zip(SKIP_REASONS, carried) if n} == {k: v for k, v in counts.items() if k != "corrupt_tar"} \
        or int(carried.sum()) == sum(counts.values())


def _dead_shards(tmp_path, kind: str) -> list[str]:
    """Two shards of a source with no usable sample: empty tars, missing files, or only bad samples."""
    if kind == "missing":
        return [str(tmp_path / "gone-000000.tar"), str(tmp_path / "gone-000001.tar")]
    url_only = [{"__key__": f"u{i}", "json": {"url": f"http://x/{i}.jpg"}} for i in range(3)]  # bad_layout
    samples = {"empty": [], "all_bad": url_only}[kind]
    return [_write(tmp_path / f"{kind}-{i:06d}.tar", samples) for i in range(2)]


@pytest.mark.parametrize("kind, message", [
    ("empty", r"its 2 shards hold no samples at all .*skipped so far: \{\}"),
    ("missing", r"its 2 shards hold no samples at all .*'corrupt_tar': 2"),
    ("all_bad", r"every one of the 6 samples in its 2 shards was skipped .*'bad_layout'"),
])
def test_a_training_source_with_no_usable_sample_stops_with_a_clear_error(tmp_path, tok, kind, message):
    stream = make_source_stream(_dead_shards(tmp_path, kind), tok, source="ltip", train=True, seq_len=16,
                                max_images=1, image_size=32, shuffle_buffer=8)
    with _fails_within(20), pytest.raises(RuntimeError, match=rf"source 'ltip': {message}.*data\.sources\.ltip=null"):
        next(iter(stream))


def test_a_training_source_with_some_empty_shards_keeps_delivering(tmp_path, tok, monkeypatch):
    # worker 0 of 2 reads one of the two shards each pass, often only the empty one: no false alarm
    monkeypatch.setenv("WORKER", "0")
    monkeypatch.setenv("NUM_WORKERS", "2")
    shards = [_write(tmp_path / "good.tar", _pairs(2)), _write(tmp_path / "empty.tar", [])]
    stream = make_source_stream(shards, tok, source="ltip", train=True, seq_len=16, max_images=1, image_size=32,
                                shuffle_buffer=1)
    with _fails_within(20):
        assert len(list(islice(stream, 40))) == 40


def test_a_dead_source_stops_the_main_process_from_a_dataloader_worker(tmp_path, tok):
    stream = make_source_stream(_dead_shards(tmp_path, "all_bad"), tok, source="vtp", train=True, seq_len=16,
                                max_images=1, image_size=32, shuffle_buffer=8)
    batches = iter(DataLoader(stream, batch_size=2, num_workers=1))
    try:
        with _fails_within(60), pytest.raises(RuntimeError) as err:
            next(batches)
    finally:
        # torch's re-raised error holds the iterator in a reference cycle; left to gc, the worker takes 5 s to stop
        batches._shutdown_workers()
    message = str(err.value)
    assert re.search(r"worker process 0.*source 'vtp': every one of the 6 samples .*data\.sources\.vtp=null",
                     message, re.S)


def test_skip_share_stops_a_stream_that_delivers_nothing(tmp_path, tok):
    bad = [{"__key__": f"b{i:03d}", "jpg": _jpg()} for i in range(50)]  # no txt: missing_text
    stream = make_source_stream([_write(tmp_path / "bad.tar", bad)], tok, source="m3w", train=True, seq_len=16,
                                max_images=1, image_size=32, shuffle_buffer=1, max_skip_share=0.2, skip_min_samples=10)
    with _fails_within(20), pytest.raises(RuntimeError, match=r"source 'm3w': 10 samples skipped in a row with none "
                                                             r"delivered .*data\.max_skip_share=20\.0%"):
        next(iter(stream))
    # skips among delivered samples are left to the training process's SkipTally, as before: 1 in 4 skipped
    # (25% > 20%) but never 10 in a row does not stop the stream
    mixed = [{"__key__": f"m{i:03d}", "jpg": _jpg(), **({} if i % 4 == 0 else {"txt": "a red square."})}
             for i in range(40)]
    stream = make_source_stream([_write(tmp_path / "mixed.tar", mixed)], tok, source="m3w", train=True, seq_len=16,
                                max_images=1, image_size=32, shuffle_buffer=1, max_skip_share=0.2, skip_min_samples=10)
    assert len(list(islice(stream, 60))) == 60 and stream.skipped.count >= 15


@pytest.mark.parametrize("cut", ["in_a_header", "at_a_member_boundary"])
def test_a_shard_truncated_between_members_counts_as_corrupt(tmp_path, tok, caplog, cut):
    full = _write(tmp_path / "full.tar", _pairs(4, "t"))
    with tarfile.open(full) as tar:
        header = [m.offset for m in tar.getmembers() if m.name.startswith("t002.")][0]  # the first member of t002
    truncated = tmp_path / "cut-000000.tar"
    truncated.write_bytes(open(full, "rb").read()[: header + (100 if cut == "in_a_header" else 0)])
    stream = make_source_stream([str(truncated)], tok, source="ltip", train=False, seq_len=16, max_images=1,
                                image_size=32)
    with caplog.at_level(logging.WARNING, logger="flamingo_lab.data.shards"):
        keys = _keys(stream)
    assert dict(stream.skipped.by_reason) == {"corrupt_tar": 1}
    assert keys == ["t000"]  # t001 goes with the lost tail: nothing after it in the cut shard says it was complete
    assert any("cut-000000.tar" in r.getMessage() and "end-of-archive" in r.getMessage() for r in caplog.records)
    whole = make_source_stream([full], tok, source="ltip", train=False, seq_len=16, max_images=1, image_size=32)
    assert len(_keys(whole)) == 4 and not whole.skipped.count


def test_mmc4_image_names_with_capitals_are_found(tmp_path, tok):
    # webdataset lower-cases member suffixes: the member CAFE01.JPG arrives as cafe01.jpg
    docs = _write(tmp_path / "docs.tar", [
        {"__key__": "doc3", "json": {"text_list": ["a red square."],
                                     "image_info": [{"image_name": "CAFE01.JPG", "matched_text_index": 0}]},
         "CAFE01.JPG": _jpg()},
    ])
    ds = make_eval_dataset({"m3w": [docs]}, tok, seq_len=16, max_images=1, image_size=32)
    out = list(ds)
    assert [x["__key__"] for x in out] == ["doc3"] and int(out[0]["n_images"]) == 1 and not ds.skipped


def test_two_ranks_times_two_workers_partition_the_shards(tiny_world_dir, tok, monkeypatch):
    world = load_world(tiny_world_dir)
    shards = world["shards"]["train"]["ltip"]
    assert len(shards) == 4
    seen = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            ds = make_source_stream(shards, tok, source="ltip", train=False, seq_len=16, max_images=1, image_size=32)
            part = _keys(ds)
            assert part
            seen += part
    assert len(seen) == len(set(seen)) == world["counts"]["train"]["ltip"]  # no duplicates, no losses
    # training streams (shards reshuffled every epoch, the same order on every rank and worker) split the same
    # way: within an epoch the parts are disjoint and cover everything
    parts = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORKER", str(worker))
            ds = make_source_stream(shards, tok, source="ltip", train=True, seed=3, seq_len=16, max_images=1,
                                    image_size=32, shuffle_buffer=1)
            parts.append({x["__key__"] for x in islice(ds, 6)})  # one epoch of this part: one shard of 6
    assert sum(map(len, parts)) == len(set().union(*parts)) == 24


# --- the mixture ---------------------------------------------------------------------------------


def test_source_specs_resolve_batches_shapes_and_drop_null_sources():
    data = {"batch_size": 16, "seq_len": 64, "max_images": 4, "frames": 1, "frame_stride": 1,
            "sources": {"m3w": {"weight": 1.0}, "ltip": {"weight": 0.2, "batch_ratio": 2.0, "max_images": 1},
                        "vtp": {"weight": 0.03, "batch_ratio": 0.25, "frames": 4}, "align": None, "laion": {"weight": 0}}}
    specs = source_specs(data)
    assert list(specs) == ["m3w", "ltip", "vtp"]
    assert [specs[s]["batch_size"] for s in specs] == [16, 32, 4]
    assert specs["ltip"]["max_images"] == 1 and specs["m3w"]["max_images"] == 4 and specs["vtp"]["frames"] == 4
    scale = loss_scale({**data, "optimisation": "accumulate"})
    assert abs(sum(scale.values()) - 1) < 1e-9 and abs(scale["m3w"] / scale["ltip"] - 5) < 1e-9
    rr = loss_scale({**data, "optimisation": "round_robin"})
    assert abs(sum(rr.values()) - 3) < 1e-9
    with pytest.raises(ValueError, match="unknown keys"):
        source_specs({**data, "sources": {"m3w": {"wieght": 1}}})
    with pytest.raises(ValueError, match="no source"):
        source_specs({**data, "sources": {"m3w": None}})
    with pytest.raises(ValueError, match="optimisation"):
        loss_scale({**data, "optimisation": "sometimes"})


def test_round_robin_gives_one_source_per_step():
    rr = RoundRobin({"a": iter(range(100)), "b": iter(range(100, 200))})
    got = list(islice(rr, 4))
    assert got == [{"a": 0}, {"b": 100}, {"a": 1}, {"b": 101}]


def test_skip_share_threshold_stops_with_a_clear_message():
    tally = SkipTally(["m3w"], max_share=0.2, min_samples=10)
    skipped = torch.zeros(8, len(SKIP_REASONS), dtype=torch.long)
    skipped[0, SKIP_REASONS.index("bad_image")] = 1
    tally.add("m3w", {"input_ids": torch.zeros(8, 4), "skipped": skipped})
    tally.check()  # 1 of 9: fine
    skipped[:, SKIP_REASONS.index("bad_json")] = 1
    tally.add("m3w", {"input_ids": torch.zeros(8, 4), "skipped": skipped})
    with pytest.raises(RuntimeError, match=r"source 'm3w': 10 of 26 samples skipped .*max_skip_share"):
        tally.check()
    d = tally.as_dict()
    assert d["per_source"]["m3w"]["skipped"] == {"bad_image": 2, "bad_json": 8} and d["seen_total"] == 16


def _real_root(tmp_path, val_samples) -> Path:
    """A folder with the least manifest that trains on real shards (load_world's error describes it)."""
    root = tmp_path / "real"
    root.mkdir()
    _write(root / "ltip-train-000000.tar", _pairs(6))
    _write(root / "ltip-val-000000.tar", val_samples)
    (root / "world.json").write_text(json.dumps(
        {"shards": {"train": {"ltip": ["ltip-train-000000.tar"]}, "val": {"ltip": ["ltip-val-000000.tar"]}}}))
    return root


def _datamodule(root, tiny_world_dir):
    from omegaconf import OmegaConf

    from flamingo_lab.config import compose
    from flamingo_lab.training.datamodule import FlamingoDataModule

    cfg = compose(["scale=tiny", f"data.root={root}", f"model.lm.tokenizer={tiny_world_dir / 'tokenizer'}",
                   "~data.sources.m3w", "~data.sources.align", "~data.sources.vtp", "data.batch_size=2"])
    dm = FlamingoDataModule(OmegaConf.to_container(cfg, resolve=True))
    dm.setup()
    return dm


def test_validation_skips_reach_the_skip_counts(tmp_path, tiny_world_dir):
    # the skips travel with the next sample: good, bad, good, bad, good, good
    val = [{"__key__": f"v{i}", "jpg": _jpg(), **({} if i in (1, 3) else {"txt": "a red square."})} for i in range(6)]
    dm = _datamodule(_real_root(tmp_path, val), tiny_world_dir)
    loader = dm.val_dataloader()
    for _ in range(2):  # two validation passes: each counted afresh
        for batch in loader:
            batch = dm.on_before_batch_transfer(batch, 0)
            assert "skipped" not in batch
    counts = dm.skip_counts()
    assert counts["val"]["per_source"]["ltip"]["skipped"] == {"missing_text": 2}
    assert counts["val"]["seen_total"] == 4 and counts["val"]["skipped_total"] == 2 and counts["val"]["passes"] == 2
    assert counts["seen_total"] == 0 and counts["skipped_total"] == 0  # training's counts are apart
    json.dumps(counts)  # it goes into results.json


def test_the_least_real_shard_manifest_trains(tmp_path, tiny_world_dir):
    dm = _datamodule(_real_root(tmp_path, _pairs(4)), tiny_world_dir)
    batch = next(iter(dm.train_loaders()["ltip"]))
    assert batch["input_ids"].shape == (2, dm.specs["ltip"]["seq_len"]) and int(batch["n_images"].sum()) == 2


def test_step_timer_counts_one_update_over_all_sources():
    from types import SimpleNamespace

    from flamingo_lab.training.callbacks import StepTimer

    timer = StepTimer()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(updates_per_cycle=3), global_step=0)
    module = SimpleNamespace(log=lambda *a, **k: None)
    timer.on_train_start(trainer, module)
    for step in range(1, 7):  # six round-robin updates over three sources: two measured steps
        timer.on_train_batch_start(trainer, module, None, step)
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module, None, None, step)
    assert len(timer.times) == 2


# --- Table 3's data rows train at the tiny scale ----------------------------------------------------------

ROWS = ["embedded", "no_video", "no_image_text", "laion", "no_m3w", "round_robin"]


@pytest.mark.parametrize("row", ROWS)
def test_table3_data_rows_compose_and_train(row, tiny_world_dir, tmp_path):
    from flamingo_lab.config import compose
    from flamingo_lab.training.datamodule import FlamingoDataModule
    from flamingo_lab.training.run import train

    cfg = compose(["scale=tiny", f"data={row}", f"data.root={tiny_world_dir}", "logger=none",
                   "trainer.max_steps=4", "trainer.enable_progress_bar=false", "eval.at_end_of_training=false"])
    expected = {"embedded": {"m3w", "ltip", "align", "vtp"}, "no_video": {"m3w", "ltip", "align"},
                "no_image_text": {"m3w", "vtp"}, "laion": {"m3w", "laion", "vtp"}, "no_m3w": {"ltip", "align", "vtp"},
                "round_robin": {"m3w", "ltip", "align", "vtp"}}[row]
    from omegaconf import OmegaConf

    dm = FlamingoDataModule(OmegaConf.to_container(cfg, resolve=True))
    assert set(dm.sources) == expected
    results = train(cfg, tmp_path)
    assert results["steps"] == 4 and results["loss"]["final"] is not None
    assert results["loss"]["val"] is not None


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_skips_after_the_last_sample_and_in_a_short_last_batch_are_counted(tmp_path, tiny_world_dir,
                                                                                     workers):
    # shard a: good x3; shard b: good x2, then bad x3. Read by one process, or one shard per worker: a last
    # batch of 2 holds one sample (not evaluated: fixed shapes), and the skips come after every delivered
    # sample; both were lost before (drop_last; no sample followed them to carry them)
    root = _real_root(tmp_path, [])
    good = {"jpg": _jpg(), "txt": "a red square."}
    _write(root / "ltip-val-a.tar", [{"__key__": f"a{i}", **good} for i in range(3)])
    _write(root / "ltip-val-b.tar", [{"__key__": f"b{i}", **(good if i < 2 else {"jpg": _jpg()})} for i in range(5)])
    (root / "world.json").write_text(json.dumps({"shards": {"train": {"ltip": ["ltip-train-000000.tar"]},
                                                            "val": {"ltip": ["ltip-val-a.tar", "ltip-val-b.tar"]}}}))
    dm = _datamodule(root, tiny_world_dir)
    dm.data["num_workers"] = workers
    evaluated = []
    for batch in dm.val_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert "partial" not in batch and batch["input_ids"].shape[0] == 2  # fixed batch shape
        evaluated.append(batch)
    counts = dm.skip_counts()["val"]
    assert counts["per_source"]["ltip"]["skipped"] == {"missing_text": 3}
    assert counts["seen_total"] == 4 == 2 * len(evaluated)


def test_validation_keeps_of_each_source_the_batches_every_rank_has():
    """With several processes, each source's batches go on while every rank has its next one (``agree``, a
    collective call in a run); the source then ends on every rank, and the others go on. Under FSDP a rank with
    one batch more waited for the others for ever (every forward gathers parameters); under DDP a rank with no
    batch of a source never logged its metric. Alone, the pass is the sources in turn, short batches left out."""
    from flamingo_lab.training.datamodule import _Validation

    def loader(source, n, short=False):
        return [{"source": [source], "i": i} for i in range(n)] + ([{"partial": 1, "source": [source]}] if short else [])

    partials, starts = [], []
    loaders = {"a": loader("a", 3, short=True), "b": loader("b", 1), "c": loader("c", 2)}
    alone = _Validation(loaders, lambda: starts.append(1), partials.append)
    got = [(b["source"][0], b["i"]) for b in alone]
    assert got == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]
    assert len(partials) == 1 and starts == [1]
    # with 3 or more loader workers a worker's short last batch can come before another's full one: alone, it
    # takes its source's turn, as before the ranks agreed (the same batches under limit_val_batches, the same
    # val/loss for a run's config key); a reviewer saw the turn go to the next full batch instead
    middle = {"a": [{"source": ["a"], "i": 0}, {"partial": 1, "source": ["a"]}, {"source": ["a"], "i": 1}],
              "b": loader("b", 2)}
    got = [(b["source"][0], b["i"]) for b in _Validation(middle, lambda: None, partials.append)]
    assert got == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]

    # another rank has 2 batches of a, 1 of b, none of c; every rank asks for each source in the same order
    other = iter([True, True, False,  # round 1: a, b, c (c ends: the other rank has none)
                  True, True,  # round 2: a, b (b ends: this rank has no second)
                  False])  # round 3: a (the other rank has no third)
    calls = []

    def agree(have):  # in a run: an all-reduce (MIN) of every rank's answer
        calls.append(have)
        return next(other) and have

    together = _Validation(loaders, lambda: None, lambda short: None, agree)
    got = [(b["source"][0], b["i"]) for b in together]
    assert calls == [True, True, True, True, False, True] and next(other, None) is None
    assert got == [("a", 0), ("b", 0), ("a", 1)]


def test_a_world_of_video_pages_needs_an_image_slot_per_clip(tiny_world_dir, tmp_path):
    """world.vtp_clips=2 writes pages of two clips; with the pairs' one image slot (data.sources.vtp.max_images=1)
    every page would be cut to its first clip without a word. The run stops before training, naming the settings
    that read the pages whole; with them the video batch holds both clips of every page."""
    from omegaconf import OmegaConf

    from flamingo_lab.config import compose
    from flamingo_lab.data.world import write_world
    from flamingo_lab.make_data import compose_world
    from flamingo_lab.training.datamodule import FlamingoDataModule

    root = tmp_path / "pages"
    write_world(compose_world("tiny", ["world.vtp_clips=2"]), root, progress=False)

    def datamodule(*extra):
        cfg = compose(["scale=tiny", f"data.root={root}", f"model.lm.tokenizer={tiny_world_dir / 'tokenizer'}",
                       "~data.sources.m3w", "~data.sources.align", "~data.sources.ltip", "data.batch_size=2",
                       "data.num_workers=0", *extra])
        dm = FlamingoDataModule(OmegaConf.to_container(cfg, resolve=True))
        dm.setup()
        return dm

    with pytest.raises(ValueError, match=r"2 clips.*data\.sources\.vtp\.max_images=2.*data\.sources\.vtp\.seq_len"):
        datamodule("data.sources.vtp.max_images=1")
    dm = datamodule("data.sources.vtp.max_images=2", "data.sources.vtp.seq_len=48")
    batch = next(iter(dm.train_loaders()["vtp"]))
    assert batch["images"].shape[1] == 2 and (batch["n_images"] == 2).all()
