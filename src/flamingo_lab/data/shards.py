"""Reading WebDataset shards into fixed-shape Flamingo samples.

Three layouts, told apart by content (so real shards work as well as the embedded world's):

- pair (img2dataset / ALIGN / LTIP / LAION): an image (``png``/``jpg``/``jpeg``), a caption (``txt``)
  and optional ``json``; it becomes ``<s><image>caption<|endofchunk|></s>``.
- doc (MMC4 / M3W): ``json`` with ``text_list`` and ``image_info`` (``matched_text_index``,
  ``image_name``) and the images as members (``0.png``, ``1.jpg``, ... or MMC4's ``image_base64``
  inside ``image_info``); each image's ``<image>`` stands before its matched sentence and
  ``<|endofchunk|>`` closes the text that belongs to an image (before the next image, and at the end).
  An ``image_info`` entry with ``frame_names`` (a list of members) in place of ``image_name`` is a clip
  (a page of videos: the embedded world's ``vtp_clips``).
- video (VTP / WebVid-style): frames ``0.png`` .. or ``0.jpg`` .. and a ``txt`` caption; one
  ``<image>`` for the clip, ``frames`` frames taken every ``frame_stride``-th. Encoded video files
  (``mp4``, ``webm``, ...) are not decoded: such a sample is skipped as ``unsupported_video``.

Every sample leaves with the same shapes (``seq_len`` tokens, ``max_images`` image slots of
``frames`` frames): on a CPU each new tensor shape costs seconds of kernel warm-up.

Decoding is explicit: only images, ``txt`` and ``json`` are read; every other member (``.pyd``,
``.pickle``, ``.pth`` ...) is ignored and never unpickled or ``torch.load``ed. A sample that fails
is skipped with a warning and counted per source and per reason (:data:`SKIP_REASONS`); each
sample carries ``skipped`` (counts per reason since the previous sample of its stream), so the
counts made in DataLoader workers reach the training process with the batches. A shard that cannot
be opened, or that stops before its end-of-archive block (truncated), counts as ``corrupt_tar``.

Each sample also carries where its stream stands (``stream_pos``: raw samples taken from the shuffle
buffer so far, this one's included; ``stream_worker``: the DataLoader worker that read it), so that a
resumed run can set each worker's stream there without decoding what it passes over
(:attr:`SourceStream.resume_from`).

A training (repeating) stream never spins without delivering: when every shard it can read has
been read to its end with no usable sample in it, it raises a RuntimeError that names the source
and the fix (see :class:`SourceStream`).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import logging
import random
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from flamingo_lab.data.world import WORLD_FORMAT

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv", "mov")
META_KEYS = ("__key__", "__url__", "__local_path__")
IGNORE_INDEX = -100
SKIP_REASONS = ("corrupt_tar", "bad_image", "bad_json", "bad_text", "missing_text", "too_many_images",
                "unsupported_video", "bad_layout")
_FRAME = re.compile(r"^(\d+)\.(png|jpe?g|webp)$", re.IGNORECASE)


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# The world on disk
# ---------------------------------------------------------------------------------------------


#: The least ``world.json`` that trains on real shards (one list of shards per source and split).
REAL_SHARDS_MANIFEST = ('{"shards": {"train": {"m3w": ["m3w-000000.tar", ...], "ltip": [...]}, '
                        '"val": {"m3w": [...], "ltip": [...]}}}')


def _absolute(root: Path, names: list[str]) -> list[str]:
    paths = [str(root / n) for n in names]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"world at {root} lists shards that are missing ({missing[:3]} ...): "
            f"rewrite it with `flamingo-data out_dir={root} force=true`"
        )
    return paths


def load_world(root: str | Path) -> dict:
    """Read ``root/world.json``; shard, task and corpus paths come back absolute, and ``root`` is added.

    A folder written by ``flamingo-import`` has a manifest with ``tasks`` only; it loads the same way.
    Real shards need a hand-written manifest with ``shards`` only (see :data:`REAL_SHARDS_MANIFEST`).
    Raises ``FileNotFoundError`` saying how to write either if it is missing or unfinished
    (``world.json`` is written last).
    """
    root = Path(root).resolve()
    path = root / "world.json"
    if not path.is_file():
        conf = Path(__file__).resolve().parents[3] / "conf" / "world" / f"{root.name}.yaml"
        world = f"world={root.name} " if conf.is_file() else ""  # data/<name>: conf/world/<name>.yaml's world
        raise FileNotFoundError(
            f"no world.json at {root} (a half-written embedded world has none either). To train on your own "
            f"WebDataset shards, write {path} yourself: {REAL_SHARDS_MANIFEST} (shard paths relative to {root}; "
            "a list under train and val for every source in data.sources; other keys are optional, "
            "and leave out format), and give real weights with model.lm.path and model.vision.checkpoint "
            "(or pretrain.lm.enabled=false pretrain.vision.enabled=false): the pretraining stages need the "
            f"synthetic world's corpus. To write the synthetic embedded world there instead, "
            f"run `flamingo-data {world}out_dir={root}`"
        )
    world = json.loads(path.read_text())
    fmt = str(world.get("format", ""))
    if fmt.startswith("flamingo-lab-world/") and fmt != WORLD_FORMAT:
        raise ValueError(
            f"the world at {root} was written in format {fmt!r}; this version reads {WORLD_FORMAT!r} (its shards, "
            f"corpus or tokenizer differ): rewrite it with `flamingo-data out_dir={root}` (and the overrides that wrote it) or delete it"
        )
    world["root"] = str(root)
    if "config" in world:  # an embedded world: keys added since it was written read as the value it was written with
        from flamingo_lab.data.world import BACKWARD_DEFAULTS

        world["config"] = {**BACKWARD_DEFAULTS, **world["config"]}
    for split, sources in world.get("shards", {}).items():
        for source, names in sources.items():
            sources[source] = _absolute(root, names)
    for task in world.get("tasks", {}).values():
        task["splits"] = {split: _absolute(root, names) for split, names in task["splits"].items()}
    if "corpus" in world:
        world["corpus"] = {split: str(root / p) for split, p in world["corpus"].items()}
    if "tokenizer" in world:
        world["tokenizer"] = str(root / world["tokenizer"])
    return world


def load_world_tokenizer(root: str | Path):
    """The world's word-level tokenizer (a ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(load_world(root)["tokenizer"])


# ---------------------------------------------------------------------------------------------
# Explicit decoding
# ---------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's ``convert`` clips 16-bit grey (PNG's ``I;16*``, or ``I`` in older Pillow, both
    0..65535) at 255, so nearly every such image would come out white: keep the top 8 bits first.
    (Float ``F`` images come only from formats we do not decode, such as TIFF.)"""
    if img.mode.startswith("I;16") or img.mode == "I":
        x = np.asarray(img).astype(np.int64)  # I;16B arrives big-endian: astype makes it native
        img = Image.fromarray((np.clip(x, 0, 65535) >> 8).astype(np.uint8))  # (H, W) uint8: mode L
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # fail here on a truncated/corrupt file, not later
        return to_rgb(img)
    except Exception as exn:  # noqa: BLE001 - PIL raises many kinds
        raise SkipSample("bad_image", f"undecodable image ({type(exn).__name__}: {exn})") from exn


def decode_sample(raw: dict) -> dict:
    """Decode the members we know (images, txt, json); drop every other member undecoded."""
    out: dict[str, Any] = {k: raw[k] for k in META_KEYS if k in raw}
    for k, v in raw.items():
        if k in META_KEYS:
            continue
        ext = k.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            out[k] = decode_image(v)
        elif ext == "txt":
            try:
                out[k] = v.decode("utf-8")
            except UnicodeDecodeError as exn:
                raise SkipSample("bad_text", f"txt is not UTF-8 ({exn})") from exn
        elif ext == "json":
            try:
                out[k] = json.loads(v)
            except (json.JSONDecodeError, UnicodeDecodeError) as exn:
                raise SkipSample("bad_json", f"malformed json ({exn})") from exn
        elif ext in VIDEO_EXTS:
            out[k] = None  # noted, never decoded: see sample_text_and_images
        # anything else (pyd, pickle, pth, npy ...) is ignored: never unpickled
    return out


# ---------------------------------------------------------------------------------------------
# Tokenising to fixed shapes
# ---------------------------------------------------------------------------------------------


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """(3, H, W) float32, normalised with mean 0.5 and std 0.5."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def _caption(sample: dict) -> str:
    text = sample.get("txt")
    if text is None:
        raise SkipSample("missing_text", "an image or clip without a txt caption")
    if not text.strip():
        raise SkipSample("missing_text", "empty txt caption")
    return text.strip()


def _doc_image(sample: dict, info: dict) -> Image.Image:
    name = info.get("image_name")
    # webdataset lower-cases member suffixes: MMC4's "CAFE01.JPG" arrives as "cafe01.jpg"
    for member in (name, name.lower() if isinstance(name, str) else None):
        if member in sample and isinstance(sample[member], Image.Image):
            return sample[member]
    if info.get("image_base64"):  # MMC4 as open_flamingo stores it: the image inside the json
        try:
            return decode_image(base64.b64decode(info["image_base64"], validate=True))
        except (binascii.Error, ValueError) as exn:
            raise SkipSample("bad_image", f"image_base64 of {name!r} is not base64") from exn
    raise SkipSample("bad_layout", f"image {name!r} named in image_info is not in the sample")


def _doc_media(sample: dict, info: dict) -> list[Image.Image]:
    """An ``image_info`` entry's frames: its ``frame_names`` (a clip), or its one image."""
    if not isinstance(info, dict):
        raise SkipSample("bad_json", "an image_info entry is not an object")
    names = info.get("frame_names")
    if names is None:
        return [_doc_image(sample, info)]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SkipSample("bad_json", f"frame_names must be a non-empty list of member names; got {names!r}")
    return [_doc_image(sample, {"image_name": n}) for n in names]


def sample_text_and_images(sample: dict) -> tuple[str, list[list[Image.Image]]]:
    """The text with ``<image>``/``<|endofchunk|>`` marks, and per ``<image>`` its frames (one for a still)."""
    meta = sample.get("json")
    if isinstance(meta, dict) and "text_list" in meta:
        text_list = meta["text_list"]
        if not isinstance(text_list, list) or not any(isinstance(t, str) and t.strip() for t in text_list):
            raise SkipSample("missing_text", "a document with no text")
        infos = meta.get("image_info") or []
        if not isinstance(infos, list):
            raise SkipSample("bad_json", "image_info is not a list")
        try:
            infos = sorted(enumerate(infos), key=lambda t: (int(t[1]["matched_text_index"]), t[0]))
        except (KeyError, TypeError, ValueError) as exn:
            raise SkipSample("bad_json", f"image_info entry without a matched_text_index ({exn})") from exn
        before: dict[int, int] = {}
        images = []
        for _, info in infos:
            i = int(info["matched_text_index"])
            if not 0 <= i < len(text_list):
                raise SkipSample("bad_layout", f"matched_text_index {i} outside text_list of {len(text_list)}")
            before[i] = before.get(i, 0) + 1
            images.append(_doc_media(sample, info))
        text = ""
        for i, sentence in enumerate(text_list):
            for _ in range(before.get(i, 0)):
                # <EOC> closes the previous image's text (the first image has none to close)
                text += (EOC_TOKEN + MEDIA_TOKEN) if MEDIA_TOKEN in text else MEDIA_TOKEN
            sentence = str(sentence)
            text += sentence if not text or text.endswith(MEDIA_TOKEN) else " " + sentence
        if images:
            text += EOC_TOKEN
        return text, images
    frames = sorted(((int(m.group(1)), k) for k in sample if (m := _FRAME.match(k))))
    if frames:  # a video clip: frames 0.png, 1.png ... and one caption
        return f"{MEDIA_TOKEN}{_caption(sample)}{EOC_TOKEN}", [[sample[k] for _, k in frames]]
    for ext in IMAGE_EXTS:
        if ext in sample:
            return f"{MEDIA_TOKEN}{_caption(sample)}{EOC_TOKEN}", [[sample[ext]]]
    if any(k.rsplit(".", 1)[-1].lower() in VIDEO_EXTS for k in sample):
        raise SkipSample("unsupported_video", "encoded video is not decoded: store frames as 0.jpg, 1.jpg, ...")
    if "json" in sample and not isinstance(meta, dict):
        raise SkipSample("bad_json", "json is not an object")
    raise SkipSample("bad_layout", f"neither a pair, a doc nor a clip: members {sorted(sample)}")


def frame_indices(n_available: int, frames: int, stride: int) -> list[int]:
    """``frames`` indices every ``stride``-th from the first; the last frame repeats if the clip is short."""
    return [min(i * stride, n_available - 1) for i in range(frames)]


class Tokenise:
    """Turn a decoded sample into fixed-shape tensors (a picklable callable for DataLoader workers).

    ``max_images`` image slots of ``frames`` frames each; a document with more images than slots is
    cut before the first image without a slot; one with more than ``max_doc_images`` is skipped.
    """

    def __init__(self, tokenizer, *, seq_len: int, max_images: int, image_size: int, frames: int = 1,
                 frame_stride: int = 1, max_doc_images: int | None = None):
        if seq_len < 2 or max_images < 1 or image_size < 1 or frames < 1 or frame_stride < 1:
            raise ValueError(
                "need seq_len >= 2, max_images >= 1, image_size >= 1, frames >= 1, frame_stride >= 1; got "
                f"{seq_len}, {max_images}, {image_size}, {frames}, {frame_stride}"
            )
        self.tokenizer = tokenizer
        self.seq_len, self.max_images, self.image_size = seq_len, max_images, image_size
        self.frames, self.frame_stride, self.max_doc_images = frames, frame_stride, max_doc_images
        self.media_id = self._special_id(MEDIA_TOKEN)
        self.eoc_id = self._special_id(EOC_TOKEN)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")

    def _special_id(self, token: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {token!r} token: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{MEDIA_TOKEN}', '{EOC_TOKEN}']}})"
            )
        return i

    def __call__(self, sample: dict, source: str) -> dict:
        text, images = sample_text_and_images(sample)
        if self.max_doc_images is not None and len(images) > self.max_doc_images:
            raise SkipSample("too_many_images", f"{len(images)} images, more than max_doc_images={self.max_doc_images}")
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if self.eos_id is not None:
            ids.append(self.eos_id)
        media_pos = [p for p, t in enumerate(ids) if t == self.media_id]
        if len(media_pos) != len(images):
            raise SkipSample("bad_layout", f"text holds {len(media_pos)} {MEDIA_TOKEN} tokens for {len(images)} images")
        if len(media_pos) > self.max_images:  # no slot for the next image: cut the text before it
            ids = ids[: media_pos[self.max_images]]
        ids = ids[: self.seq_len]
        n_images = sum(t == self.media_id for t in ids)  # images whose <image> survived the cut
        n = len(ids)
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[:n] = 1
        labels = input_ids.clone()
        labels[attention_mask == 0] = IGNORE_INDEX
        labels[input_ids == self.media_id] = IGNORE_INDEX
        F = self.frames
        pixels = torch.zeros(self.max_images, F, 3, self.image_size, self.image_size)  # (T_img, F, C, H, W)
        for i in range(n_images):
            clip = images[i]
            for f, j in enumerate(frame_indices(len(clip), F, self.frame_stride)):
                pixels[i, f] = image_to_tensor(clip[j], self.image_size)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "images": pixels,
            "n_images": torch.tensor(n_images, dtype=torch.long),
            "source": source,
        }


# ---------------------------------------------------------------------------------------------
# Pipeline stages
# ---------------------------------------------------------------------------------------------


def _node_and_worker() -> tuple[int, int, int, int]:
    return wds.utils.pytorch_worker_info()  # (rank, world_size, worker, num_workers)


def _stream_seed(seed: int, *salt: int) -> int:
    rank, _, worker, _ = _node_and_worker()
    return hash((seed, rank, worker) + salt) & 0x7FFFFFFF  # ints hash stably across processes


class _ShardList:
    """Shard urls for this node and worker: seeded shuffle per epoch, then split; repeats if asked."""

    def __init__(self, urls: list[str], *, source: str, shuffle: bool, repeat: bool, seed: int):
        if not urls:
            raise ValueError(f"source {source!r} has no shards")
        self.urls, self.source, self.shuffle, self.repeat, self.seed = list(urls), source, shuffle, repeat, seed

    @staticmethod
    def _mine(order: list[str]) -> list[str]:
        return list(wds.split_by_worker(wds.split_by_node(order)))

    def passes(self) -> Iterator[list[str]]:
        """This node and worker's shards, one list per pass (epoch); one pass unless ``repeat``."""
        rank, world_size, worker, num_workers = _node_and_worker()
        need = world_size * num_workers
        if len(self.urls) < need:
            raise ValueError(
                f"source {self.source!r} has {len(self.urls)} shards but {world_size} nodes x {num_workers} "
                f"workers need at least {need}: write more, smaller shards (world.min_shards={need}) "
                f"or use fewer DataLoader workers"
            )
        epoch = 0
        while True:
            order = list(self.urls)
            if self.shuffle:  # the same order on every node and worker, so the split is a partition
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            yield self._mine(order)
            epoch += 1
            if not self.repeat:
                return

    def reachable(self) -> set[str]:
        """The shards this node and worker can ever be given: all (reshuffled every pass) or its fixed part."""
        return set(self.urls) if self.shuffle else set(self._mine(list(self.urls)))


def _shuffle(src: Iterable, bufsize: int, seed: int) -> Iterator:
    rng = random.Random(_stream_seed(seed, 1))
    buf: list = []
    for x in src:
        buf.append(x)
        if len(buf) >= bufsize:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Notes on its TarFile when the end-of-archive block is read. Reading a stream (``r|*``), Python's
    tarfile stops quietly at a member header cut short by truncation, just as at the real end; this
    tells the two apart."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_of_archive_read = True
            raise


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own members (``__key__`` ...): not data


def tar_members(fileobj, url: str) -> Iterator[dict]:
    """The regular members of a tar stream (plain or compressed, read once front to back), as
    webdataset's ``tar_file_iterator`` gives them: ``{"fname", "data", "__url__"}``.

    Raises ``tarfile.ReadError`` where the archive stops before its end-of-archive block: a truncated
    shard, which tarfile itself would end quietly when the cut falls in a member header.
    """
    tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndMarkedTarInfo)
    for info in tar:
        if info.isreg() and not _META_MEMBER.match(info.name):
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        tar.members = []  # a stream: keep no list of every member read
    if not getattr(tar, "end_of_archive_read", False):
        raise tarfile.ReadError(
            f"{url} stops after {tar.offset} bytes without an end-of-archive block (truncated?): "
            "its last members are lost; rewrite or re-download the shard"
        )


class SkipCounter:
    """Counts samples skipped in this process per reason (each DataLoader worker has its own copy)."""

    def __init__(self, source: str = "?"):
        self.source = source
        self.by_reason: Counter = Counter()
        self.pending: Counter = Counter()  # not yet reported with a sample

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, what: str, exn: BaseException, reason: str | None = None) -> None:
        reason = reason or getattr(exn, "reason", None) or "bad_layout"
        self.by_reason[reason] += 1
        self.pending[reason] += 1
        rank, _, worker, _ = _node_and_worker()
        log.warning(
            "skipped %s of %r (%s: %s: %s); %d skipped so far in rank %d worker %d",
            what, self.source, reason, type(exn).__name__, exn, self.count, rank, worker,
        )

    def take_pending(self) -> torch.Tensor:
        """Counts per reason (in :data:`SKIP_REASONS` order) since the last call, as a (R,) tensor."""
        out = torch.tensor([self.pending[r] for r in SKIP_REASONS], dtype=torch.long)
        self.pending.clear()
        return out


def skip_tensor_to_dict(counts: torch.Tensor) -> dict[str, int]:
    """A ``skipped`` tensor (..., R) summed into {reason: count} (reasons with 0 left out)."""
    totals = counts.reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
    return {r: int(n) for r, n in zip(SKIP_REASONS, totals) if n}


def read_shard(url: str, skip: Callable[[str, BaseException, str], None],
               member_error: Callable[[BaseException], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard (members grouped by key, suffixes lower-cased, as webdataset does).

    A shard that cannot be opened or stops before its end is reported as ``skip(what, exn, "corrupt_tar")``
    and read no further; the sample it stops in is dropped with the rest (no later member says that it was
    complete). ``member_error(exn)`` decides about a member that cannot be grouped (True: go on); by
    default it is skipped as ``corrupt_tar`` too. Training streams and the vision pretraining stage share
    this reader, so a truncated shard is found the same way in both."""
    if member_error is None:
        def member_error(exn: BaseException) -> bool:
            skip(f"a member of shard {url}", exn, "corrupt_tar")
            return True
    try:
        stream = wds.gopen(url)
    except Exception as exn:  # noqa: BLE001 - missing file, failed download ...
        skip(f"shard {url}", exn, "corrupt_tar")
        return
    try:
        yield from wds.tariterators.group_by_keys(tar_members(stream, url), handler=member_error)
    except Exception as exn:  # noqa: BLE001 - truncated or corrupt archive
        skip(f"the rest of shard {url}", exn, "corrupt_tar")
    finally:
        stream.close()


class _DryShards:
    """The shards a stream has read to their end since it last delivered a sample, with no usable sample
    in them. Once every shard it can read is among them, a repeating stream would spin for ever.

    Counted per read of a shard: a read is settled when it has ended and each of its samples has come
    out of the shuffle buffer and been tried; a read that delivered nothing makes its shard dry, and
    any delivered sample makes every shard wet again (so a shard with one good sample never stops a run).
    """

    def __init__(self, reachable: set[str]):
        self.reachable = reachable
        self.reads: dict[int, dict] = {}  # open reads: url, samples read, not yet tried, ended, delivered
        self.dry: dict[str, int] = {}  # url -> samples its last read held
        self._ids = 0

    def start(self, url: str) -> int:
        self._ids += 1
        self.reads[self._ids] = {"url": url, "read": 0, "untried": 0, "ended": False, "delivered": False}
        return self._ids

    def read(self, rid: int) -> None:
        self.reads[rid]["read"] += 1
        self.reads[rid]["untried"] += 1

    def end(self, rid: int) -> bool:
        self.reads[rid]["ended"] = True
        return self._settle(rid)

    def tried(self, rid: int, delivered: bool) -> bool:
        self.reads[rid]["untried"] -= 1
        if delivered:
            self.reads[rid]["delivered"] = True
            self.dry.clear()
        return self._settle(rid)

    def _settle(self, rid: int) -> bool:
        """True when this settles the last shard that could still deliver: the stream is starved."""
        r = self.reads[rid]
        if not r["ended"] or r["untried"]:
            return False
        del self.reads[rid]
        if not r["delivered"]:
            self.dry[r["url"]] = r["read"]
        return not r["delivered"] and self.reachable.issubset(self.dry)


class SourceStream(IterableDataset):
    """One source's samples as fixed-shape dicts: shards -> tar members -> decode -> tokenise.

    A repeating (training) stream never spins without delivering. It raises a RuntimeError naming the
    source, its shards, the skip reasons and the fix when every shard it can read has been read to its
    end since its last delivered sample with no usable sample in it (empty, missing, unreadable, or
    every sample skipped); and, given ``max_skip_share``, when ``skip_min_samples`` samples in a row
    were skipped while this process's skipped share is above it. The training process applies that
    threshold to the delivered batches (:class:`~flamingo_lab.data.mixture.SkipTally`); a stream that
    delivers nothing never reaches it there, so it checks here too.

    Resuming: ``resume_from`` maps a DataLoader worker (0 without workers) to the raw samples its stream
    passes over before it decodes anything: the ``stream_pos`` of the last sample that worker delivered
    before the checkpoint. Set it before the loader's iterator is made (workers start with a copy of the
    dataset). The shards are read and shuffled as before, so the stream then goes on exactly as the
    uninterrupted one; only the decoding and tokenising of what it passes over are saved.
    """

    def __init__(
        self,
        urls: list[str],
        tokenise: Tokenise,
        *,
        source: str,
        shuffle: bool,
        repeat: bool,
        seed: int = 0,
        shuffle_buffer: int = 500,
        max_skip_share: float | None = None,
        skip_min_samples: int = 200,
    ):
        self.source, self.tokenise = source, tokenise
        self.shards = _ShardList(urls, source=source, shuffle=shuffle, repeat=repeat, seed=seed)
        self.shuffle, self.repeat, self.seed, self.shuffle_buffer = shuffle, repeat, seed, shuffle_buffer
        self.max_skip_share, self.skip_min_samples = max_skip_share, skip_min_samples
        self.skipped = SkipCounter(source)
        self.delivered = 0  # samples this process's stream has yielded
        self.resume_from: dict[int, int] = {}  # worker -> raw samples to pass over undecoded (see above)

    # -- skips --------------------------------------------------------------------------------

    def _skip(self, what: str, exn: BaseException, reason: str | None = None) -> None:
        self.skipped.skip(what, exn, reason)
        self._check_skip_share()

    def _check_skip_share(self) -> None:
        if self.max_skip_share is None:
            return
        in_a_row = sum(self.skipped.pending.values())  # skipped since the last delivered sample
        bad = self.skipped.count
        share = bad / (bad + self.delivered)
        if in_a_row >= self.skip_min_samples and share > self.max_skip_share:
            rank, _, worker, _ = _node_and_worker()
            raise RuntimeError(
                f"source {self.source!r}: {in_a_row} samples skipped in a row with none delivered ({bad} of "
                f"{bad + self.delivered} skipped in rank {rank} worker {worker}, {share:.1%}), more than "
                f"data.max_skip_share={self.max_skip_share:.1%}; reasons {dict(self.skipped.by_reason)}. Fix or "
                f"drop its shards (the warnings above name them), leave the source out with "
                f"data.sources.{self.source}=null, or raise data.max_skip_share"
            )

    def _starved(self, dry: dict[str, int], reachable: set[str]) -> RuntimeError:
        n = len(set(self.shards.urls))
        shards = f"its {n} shard{'s' if n > 1 else ''}"
        if len(reachable) < n:  # a fixed part per worker (an unshuffled repeating stream)
            shards = f"the {len(reachable)} of its {n} shards that this worker reads"
        reasons = dict(self.skipped.by_reason)
        fix = (f"repair or rewrite the shards (the warnings above name them), or leave the source out with "
               f"data.sources.{self.source}=null")
        if not any(dry.values()):
            return RuntimeError(
                f"source {self.source!r}: {shards} hold{'s' if shards.endswith('shard') else ''} no samples at all "
                f"(each is empty, missing or unreadable; skipped so far: {reasons}), so its training stream can "
                f"never deliver a batch: {fix}"
            )
        return RuntimeError(
            f"source {self.source!r}: every one of the {sum(dry.values())} samples in {shards} was skipped "
            f"(skipped so far, re-reading them: {reasons}), so its training stream can never deliver a batch: {fix}"
        )

    # -- reading ------------------------------------------------------------------------------

    def _member_error(self, url: str, exn: BaseException) -> bool:
        self.skipped.skip(f"a member of shard {url}", exn, "corrupt_tar")
        return True  # keep the rest of the shard

    def _read(self, url: str) -> Iterator[dict]:
        return read_shard(url, self._skip, lambda exn: self._member_error(url, exn))

    def _pass_over(self, items: Iterator[tuple[int, dict]], n: int, dry: _DryShards) -> int:
        """Take ``n`` raw samples from ``items`` without decoding them; returns how many there were.

        The checkpoint proves the stream delivered up to here, so each read they belong to counts as having
        delivered (no shard is taken for dry on their account; at worst a source that goes dry just after the
        resume is found one read of its shards later). Skips met again on the way (a corrupt shard read anew)
        were counted before the checkpoint, in the tally it restores: they go to a counter that is dropped,
        and the stream's own skip-share check waits until it decodes again.
        """
        counted, guard = self.skipped, self.max_skip_share
        self.skipped, self.max_skip_share = SkipCounter(self.source), None
        try:
            passed = 0
            for rid, _ in itertools.islice(items, n):
                dry.tried(rid, delivered=True)
                passed += 1
            return passed
        finally:
            self.skipped, self.max_skip_share = counted, guard

    def __iter__(self) -> Iterator[dict]:
        reachable = self.shards.reachable()
        dry = _DryShards(reachable)
        _, _, worker, _ = _node_and_worker()

        def raw() -> Iterator[tuple[int, dict]]:
            for urls in self.shards.passes():
                for url in urls:
                    rid = dry.start(url)
                    for sample in self._read(url):
                        dry.read(rid)
                        yield rid, sample
                    if dry.end(rid) and self.repeat:
                        raise self._starved(dry.dry, reachable)

        items: Iterator[tuple[int, dict]] = raw()
        if self.shuffle:
            items = _shuffle(items, self.shuffle_buffer, self.seed)
        tried = self._pass_over(items, int(self.resume_from.get(worker, 0)), dry)
        # Each sample is held until the next is ready, so a finite stream's last sample can also carry the
        # skips after it (none is lost at the end of a validation pass)
        held = None
        for rid, sample in items:
            tried += 1  # delivered or skipped: either way a resumed stream passes over it
            key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                out = self.tokenise(decode_sample(sample), self.source)
            except Exception as exn:  # noqa: BLE001 - any bad sample is skipped and counted
                self._skip(f"sample {key}", exn)
                if dry.tried(rid, delivered=False) and self.repeat:
                    raise self._starved(dry.dry, reachable) from None
                continue
            dry.tried(rid, delivered=True)
            self.delivered += 1
            out["__key__"] = sample.get("__key__", "")
            out["skipped"] = self.skipped.take_pending()
            out["stream_pos"], out["stream_worker"] = torch.tensor(tried), torch.tensor(worker)
            if held is not None:
                yield held
            held = out
        if held is not None:
            held["skipped"] = held["skipped"] + self.skipped.take_pending()
            yield held


# ---------------------------------------------------------------------------------------------
# Datasets for training and evaluation
# ---------------------------------------------------------------------------------------------


class MixtureDataset(IterableDataset):
    """Infinite: each sample comes from a source drawn with probability proportional to its weight
    (one stream, one shape; the training DataModule instead gives each source its own loader)."""

    def __init__(self, streams: dict[str, SourceStream], weights: dict[str, float], seed: int):
        self.streams, self.weights, self.seed = streams, weights, seed
        self.names = sorted(streams)

    @property
    def skipped(self) -> int:
        return sum(s.skipped.count for s in self.streams.values())

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(_stream_seed(self.seed, 2))
        its = {n: iter(self.streams[n]) for n in self.names}
        w = [self.weights[n] for n in self.names]
        while True:
            name = rng.choices(self.names, weights=w)[0]
            try:
                yield next(its[name])
            except StopIteration:  # only if every sample of a source fails: say so, don't spin
                raise RuntimeError(
                    f"source {name!r} yields no samples (all skipped? see the warnings above)"
                ) from None


class ConcatDataset(IterableDataset):
    """Finite, in a fixed order: each source's shards in turn (split by node and worker)."""

    def __init__(self, streams: dict[str, SourceStream]):
        self.streams = streams

    @property
    def skipped(self) -> int:
        return sum(s.skipped.count for s in self.streams.values())

    def skip_counts(self) -> dict[str, dict[str, int]]:
        return {n: dict(s.skipped.by_reason) for n, s in self.streams.items()}

    def __iter__(self) -> Iterator[dict]:
        for name in sorted(self.streams):
            yield from self.streams[name]


def _check_shards(shards: dict[str, list[str]]) -> None:
    if not shards:
        raise ValueError("no sources given: pass shards={'m3w': [...], 'ltip': [...]}")
    for name, urls in shards.items():
        if isinstance(urls, (str, Path)):
            raise TypeError(f"shards[{name!r}] must be a list of shard paths, got a single {type(urls).__name__}")
        if not urls:
            raise ValueError(f"source {name!r} has an empty shard list")


def make_source_stream(urls: list[str], tokenizer, *, source: str, train: bool, seed: int = 0,
                       shuffle_buffer: int = 500, max_skip_share: float | None = None, skip_min_samples: int = 200,
                       **shape) -> SourceStream:
    """One source's stream: infinite and shuffled (``train``) or every sample once, in order.

    ``shape``: seq_len, max_images, image_size and optionally frames, frame_stride, max_doc_images.
    ``max_skip_share`` / ``skip_min_samples``: data.max_skip_share / data.skip_min_samples, checked in the
    stream while it delivers nothing (see :class:`SourceStream`).
    """
    _check_shards({source: urls})
    return SourceStream(list(urls), Tokenise(tokenizer, **shape), source=source, shuffle=train, repeat=train,
                        seed=seed, shuffle_buffer=shuffle_buffer, max_skip_share=max_skip_share,
                        skip_min_samples=skip_min_samples)


def make_train_dataset(
    shards: dict[str, list[str]],
    weights: dict[str, float],
    tokenizer,
    *,
    seed: int,
    shuffle_buffer: int = 500,
    **shape,
) -> MixtureDataset:
    """Infinite, shuffled (seeded) mixture of sources at one shape; sources with weight 0 are left out."""
    _check_shards(shards)
    missing = sorted(set(weights) - set(shards))
    unweighted = sorted(set(shards) - set(weights))
    if missing or unweighted:
        raise ValueError(
            f"weights and shards must name the same sources: weights without shards {missing}, "
            f"shards without weights {unweighted}"
        )
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0 with at least one > 0; got {weights}")
    tok = Tokenise(tokenizer, **shape)
    streams = {
        name: SourceStream(
            list(urls), tok, source=name, shuffle=True, repeat=True, seed=seed + 7919 * i,
            shuffle_buffer=shuffle_buffer,
        )
        for i, (name, urls) in enumerate(sorted(shards.items()))
        if weights[name] > 0
    }
    return MixtureDataset(streams, {n: float(weights[n]) for n in streams}, seed)


def make_eval_dataset(shards: dict[str, list[str]], tokenizer, **shape) -> ConcatDataset:
    """Finite, unshuffled: every sample once (across nodes and workers), sources in name order."""
    _check_shards(shards)
    tok = Tokenise(tokenizer, **shape)
    streams = {
        name: SourceStream(list(urls), tok, source=name, shuffle=False, repeat=False)
        for name, urls in sorted(shards.items())
    }
    return ConcatDataset(streams)
