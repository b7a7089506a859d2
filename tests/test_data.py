"""The embedded world and the shard pipeline: determinism, fixed shapes, safe decoding, splitting."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from flamingo_lab.data.shards import (
    IGNORE_INDEX,
    Tokenise,
    decode_image,
    decode_sample,
    image_to_tensor,
    load_world,
    load_world_tokenizer,
    make_eval_dataset,
    make_train_dataset,
    to_rgb,
)
from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from flamingo_lab.data.world import WorldConfig, encode_sample, make_doc_sample, make_pair, write_world

SHAPE = dict(seq_len=48, max_images=3, image_size=32)


@pytest.fixture(scope="module")
def world(tiny_world_dir):
    return load_world(tiny_world_dir)


@pytest.fixture(scope="module")
def tok(tiny_world_dir):
    return load_world_tokenizer(tiny_world_dir)


def _small(seed: int, workers: int = 1) -> WorldConfig:
    sizes = {f"n_{sp}_{so}": n for sp, n in (("train", 6), ("val", 2)) for so in ("m3w", "ltip", "align", "laion", "vtp")}
    return WorldConfig(name="t", seed=seed, **sizes, n_support=4, n_test=4, n_episodes=2, episode_support=5,
                       episode_test=2, n_corpus_train=10, n_corpus_val=2, min_shards=2, workers=workers)


def _tar_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


# --- the world ------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_shards(tmp_path):
    # b is written by two processes: the bytes do not depend on it
    a, b, c = (write_world(_small(s, w), tmp_path / n, progress=False) for s, w, n in ((0, 1, "a"), (0, 2, "b"), (1, 1, "c")))
    ha, hb, hc = (_tar_hashes(tmp_path / n) for n in "abc")
    assert len(ha) == 2 * 5 * 2 + 7 * 2 * 2 and ha == hb  # 2 shards per split x source, and per task x split
    assert set(ha) == set(hc) and all(ha[k] != hc[k] for k in ha)
    assert a["shards"] == c["shards"] and a["counts"] == b["counts"]


def test_world_config_rejects_bad_values_with_a_fix():
    with pytest.raises(ValueError, match="world.shapes must be a non-empty subset"):
        WorldConfig(shapes=["hexagon"])
    with pytest.raises(ValueError, match="max_images_per_doc"):
        WorldConfig(min_images_per_doc=3, max_images_per_doc=2)


def test_doc_places_each_image_before_its_sentence():
    doc = next(d for d in (make_doc_sample(_small(0), "train", i) for i in range(50)) if d["json"]["page_kind"] == "describe")
    meta = doc["json"]
    n = len(meta["image_info"])
    assert 2 <= n <= 5 and all(f"{i}.png" in doc for i in range(n))
    idx = [info["matched_text_index"] for info in meta["image_info"]]
    assert idx == sorted(idx) and all(0 <= i < len(meta["text_list"]) for i in idx)
    assert "in all there are" in " ".join(meta["text_list"][idx[-1]:])  # a count over the page, after the images


def test_missing_or_unfinished_world_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `flamingo-data out_dir=") as err:
        load_world(tmp_path)
    # it also says how to train on real shards (a hand-written manifest), not only how to write synthetic data
    message = str(err.value)
    assert "To train on your own WebDataset shards" in message and "model.lm.path" in message
    manifest = message[message.index('{"shards"'):]
    manifest = manifest[: manifest.index("}}}") + 3].replace(", ...", "").replace("[...]", "[]")
    assert set(json.loads(manifest)["shards"]) == {"train", "val"}


# --- tokenising to fixed shapes ---------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [6, 16, 40, 128])
@pytest.mark.parametrize("max_images", [1, 2, 5])
def test_doc_tokens_match_kept_images(tok, seq_len, max_images):
    tokenise = Tokenise(tok, seq_len=seq_len, max_images=max_images, image_size=32)
    media, eoc = tok.convert_tokens_to_ids(MEDIA_TOKEN), tok.convert_tokens_to_ids(EOC_TOKEN)
    for index in range(8):
        sample = decode_sample(encode_sample(make_doc_sample(_small(0), "train", index)))
        n_doc = len(sample["json"]["image_info"])
        out = tokenise(sample, "m3w")
        ids, mask, labels, images, k = out["input_ids"], out["attention_mask"], out["labels"], out["images"], out["n_images"]
        assert ids.shape == mask.shape == labels.shape == (seq_len,) and ids.dtype == torch.long
        assert images.shape == (max_images, 1, 3, 32, 32) and images.dtype == torch.float32
        k = int(k)
        assert int((ids[mask.bool()] == media).sum()) == k <= min(max_images, n_doc)
        if seq_len >= 128:
            assert k == min(max_images, n_doc)  # nothing cut by length: only the slots limit
        # the images kept are the first k, in order; empty slots are zero
        for i in range(k):
            assert torch.equal(images[i, 0], image_to_tensor(sample[f"{i}.png"], 32))
        assert not images[k:].any()
        # a doc cut for want of slots ends before the first <image> without a slot: its EOC is the last token
        if n_doc > max_images and seq_len >= 128:
            assert ids[int(mask.sum()) - 1] == eoc
        assert (labels[mask == 0] == IGNORE_INDEX).all() and (labels[ids == media] == IGNORE_INDEX).all()
        keep = (mask == 1) & (ids != media)
        assert torch.equal(labels[keep], ids[keep])


def test_pair_format(tok):
    sample = decode_sample(encode_sample(make_pair(_small(0), "train", 0, "ltip")))
    out = Tokenise(tok, **SHAPE)(sample, "ltip")
    n = int(out["attention_mask"].sum())
    ids = out["input_ids"][:n].tolist()
    assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids(MEDIA_TOKEN)
    assert ids[-2:] == [tok.convert_tokens_to_ids(EOC_TOKEN), tok.eos_token_id]
    assert tok.decode(ids[2:-2]).replace(" ", "") == sample["txt"].replace(" ", "")
    assert int(out["n_images"]) == 1 and out["images"][0].abs().sum() > 0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grey_pngs_keep_their_grey_levels():
    # PIL's convert("RGB") clips 0..65535 at 255: all but the darkest 16-bit greys came out white
    levels = np.array([[0, 255, 16384, 32768, 65535]], dtype=np.uint16)
    img = decode_image(_png(Image.fromarray(levels)))  # a 16-bit grey PNG (mode I;16)
    assert img.mode == "RGB" and [img.getpixel((i, 0)) for i in range(5)] == [(v, v, v) for v in (0, 0, 64, 128, 255)]
    assert decode_image(_png(Image.new("L", (2, 2), 1))).getpixel((0, 0)) == (1, 1, 1)  # 8-bit grey: unchanged
    assert to_rgb(Image.new("I", (2, 2), 16384)).getpixel((0, 0)) == (64, 64, 64)  # how older Pillow reads them


# --- safe decoding --------------------------------------------------------------------------


class _SideEffect:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this creates a folder: proof that something unpickled it
        return (os.mkdir, (self.path,))


def test_decoding_never_unpickles_and_skips_corrupt_samples(tmp_path, tok, caplog):
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_SideEffect(str(marker)))
    shard = tmp_path / "mixed-000000.tar"
    cfg = _small(0)
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i in range(6):
            s = encode_sample(make_pair(cfg, "train", i, "ltip"))
            if i == 1:
                s["pyd"] = evil
                s["pickle"] = evil
            if i == 3:
                s["png"] = s["png"][:40] + b"garbage" * 10  # a corrupt PNG
            w.write(s)
    ds = make_eval_dataset({"ltip": [str(shard)]}, tok, **SHAPE)
    with caplog.at_level(logging.WARNING, logger="flamingo_lab.data.shards"):
        keys = [x["__key__"] for x in ds]
    assert not marker.exists()
    assert keys == [f"train-ltip-{i:07d}" for i in (0, 1, 2, 4, 5)]
    assert ds.skipped == 1 and ds.skip_counts() == {"ltip": {"bad_image": 1}}
    assert any("train-ltip-0000003" in r.getMessage() and "1 skipped" in r.getMessage() for r in caplog.records)


# --- splitting, mixing, loading ------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_eval_pass_sees_every_sample_once(world, tok, num_workers):
    shards = {s: world["shards"]["val"][s] for s in ("m3w", "ltip")}
    assert len(shards["ltip"]) == 4
    ds = make_eval_dataset(shards, tok, **SHAPE)
    keys = []
    for batch in DataLoader(ds, batch_size=4, num_workers=num_workers):
        assert batch["input_ids"].shape == (len(batch["__key__"]), 48)
        assert batch["images"].shape[1:] == (3, 1, 3, 32, 32)
        keys += batch["__key__"]
    counts = world["counts"]["val"]
    assert len(keys) == len(set(keys)) == counts["ltip"] + counts["m3w"]


def test_too_few_shards_for_the_workers_is_a_clear_error(world, tok, monkeypatch):
    # webdataset reads node and worker from these variables first; a real DataLoader worker that
    # raises costs torch ~5 s per worker at shutdown, so this runs in-process
    ds = make_eval_dataset({"ltip": world["shards"]["val"]["ltip"][:1]}, tok, **SHAPE)
    monkeypatch.setenv("WORKER", "0")
    monkeypatch.setenv("NUM_WORKERS", "2")
    with pytest.raises(ValueError, match=r"has 1 shards but 1 nodes x 2 workers need at least 2"):
        list(ds)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = make_eval_dataset({"ltip": world["shards"]["val"]["ltip"]}, tok, **SHAPE)  # 4 shards: enough
    assert len({x["__key__"] for x in ds}) < world["counts"]["val"]["ltip"]  # this node x worker's part
    ds = make_train_dataset({"ltip": world["shards"]["train"]["ltip"][:3]}, {"ltip": 1.0}, tok, seed=0, **SHAPE)
    with pytest.raises(ValueError, match=r"2 nodes x 2 workers need at least 4"):
        next(iter(ds))


def test_mixture_honours_weights_and_seed(world, tok):
    def keys(seed, n):
        ds = make_train_dataset({s: world["shards"]["train"][s] for s in ("ltip", "m3w")}, {"ltip": 0.8, "m3w": 0.2},
                                tok, seed=seed,
                                seq_len=16, max_images=2, image_size=32)
        return [(x["source"], x["__key__"]) for x in islice(ds, n)]

    drawn = keys(0, 500)
    frac = Counter(s for s, _ in drawn)["ltip"] / len(drawn)
    assert abs(frac - 0.8) < 0.07
    assert keys(0, 60) == drawn[:60]
    assert keys(1, 60) != drawn[:60]
    assert len({k for _, k in drawn}) == world["counts"]["train"]["ltip"] + world["counts"]["train"]["m3w"]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_train_batches_have_fixed_shapes_in_workers(world, tok, num_workers):
    ds = make_train_dataset({s: world["shards"]["train"][s] for s in ("ltip", "m3w")}, {"ltip": 0.5, "m3w": 0.5}, tok,
                            seed=0, **SHAPE)
    for batch in islice(DataLoader(ds, batch_size=4, num_workers=num_workers), 6):
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 48)
        assert batch["images"].shape == (4, 3, 1, 3, 32, 32) and batch["n_images"].shape == (4,)


def test_flamingo_data_cli_writes_a_readable_world_and_skips_a_rewrite(tmp_path, tok):
    exe = Path(sys.executable).parent / "flamingo-data"
    cmd = [str(exe), "world=tiny", f"out_dir={tmp_path / 'w'}", "progress=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    world = load_world(tmp_path / "w")
    assert world["config"]["name"] == "tiny"
    ds = make_train_dataset({s: world["shards"]["train"][s] for s in ("ltip", "m3w")}, {"ltip": 1.0, "m3w": 1.0},
                            load_world_tokenizer(tmp_path / "w"), seed=0, **SHAPE)
    assert next(iter(ds))["input_ids"].shape == (48,)
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert second.returncode == 0 and "skipping" in second.stdout + second.stderr
    assert not (tmp_path / "outputs").exists()
