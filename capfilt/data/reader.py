"""Shard reader: expand shard specs, stream tar members into samples, decode and preprocess in DataLoader workers.

Everything that can be wrong with input data becomes a `Sample` with an `error` reason code instead of an
exception, so one bad image, caption or tar never takes good samples down with it.

The batch contract between this layer and the models: each model exposes `preprocess`, a picklable `Preprocess`
(one decoded RGB PIL image -> that model's own inputs for it: a dict of tensors, e.g. BLIP's
`{"pixel_values": (1, 3, H, W)}`, Qwen2-VL's patch rows and `image_grid_thw`, Idefics3's crops, a VLM's prompt
`input_ids`), and a `.signature` string (equal signatures: identical preprocessing, so two models share one
result). The workers run every distinct preprocess on every decoded image, so all CPU preprocessing (resizing,
cropping, patching, tokenising the prompt) overlaps with the models' compute. A `Batch` then carries
`inputs[signature]`: one entry per usable sample, in order (`Sample.input_row` indexes it), each the dict that
preprocess returned for that image. The models take a list of such entries and collate it themselves
(concatenating, padding), so any subset or slice of a batch (samples dropped, OOM halving) is a list slice.
An image a preprocess refuses becomes an `image_rejected` error sample, as an undecodable one is `corrupt_image`.
"""

from __future__ import annotations

import ctypes
import glob
import io
import json
import os
import signal
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from capfilt.data.schema import (
    BAD_JSON,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_LONG,
    CORRUPT_IMAGE,
    DUPLICATE_KEY,
    EMPTY_TAR,
    IMAGE_REJECTED,
    IMAGE_TOO_LARGE,
    JSON_TOO_LARGE,
    NO_IMAGE,
    TRUNCATED_TAR,
    UNREADABLE_TAR,
    error_detail,
    read_candidates,
)
from capfilt.errors import CapfiltError
from capfilt.settings import RunConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# ----------------------------------------------------------------------------------------------- specs


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand_specs(specs: Sequence[str], outputs: bool = True) -> list[str]:
    """Turn user shard specs (files, directories, globs, brace patterns, URLs, `pipe:`) into shard URLs.

    Order is kept (and sorted within a directory or glob) so that a rerun sees the shards in the same order.
    Raises CapfiltError when a spec matches nothing or (`outputs`: the caller writes one output per shard) two
    shards would write the same output name.
    """
    urls: list[str] = []
    for spec in specs:
        expanded = list(wds.shardlists.expand_urls(spec)) if "{" in spec else [spec]
        for item in expanded:
            if _is_url(item):
                urls.append(item)
            elif os.path.isdir(item):
                found = sorted(p for p in glob.glob(os.path.join(item, "*")) if p.endswith(SHARD_SUFFIXES))
                if not found:
                    raise CapfiltError(f"no input matched: directory {item!r} holds no .tar shards")
                urls.extend(found)
            elif glob.has_magic(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise CapfiltError(f"no input matched: {item!r}")
                urls.extend(found)
            elif os.path.isfile(item):
                urls.append(item)
            else:
                raise CapfiltError(f"no input matched: {item!r} does not exist")
    if not urls:
        raise CapfiltError("no input matched: give at least one shard, directory, glob or URL")
    seen: dict[str, str] = {}
    for url in urls if outputs else ():
        name = shard_name(url)
        if name in seen and seen[name] != url:
            raise CapfiltError(f"two input shards would write the same output {name!r}: {seen[name]} and {url}")
        seen[name] = url
    return list(dict.fromkeys(urls))


def local_file(url: str) -> str | None:
    """The local file a shard URL reads, when it names one: a path, or a `pipe:` command's existing tar argument."""
    if url.startswith("pipe:"):
        words = [w for w in url[len("pipe:") :].split() if w.endswith(SHARD_SUFFIXES) and os.path.isfile(w)]
        return words[-1] if words else None
    return None if _is_url(url) else url


def shard_name(url: str) -> str:
    """Output base name of a shard: its file name without the tar suffix (`pipe:`: the last word naming a tar)."""
    base = url
    if url.startswith("pipe:"):
        words = url[len("pipe:") :].split()
        base = next((w for w in reversed(words) if w.endswith(SHARD_SUFFIXES)), words[-1])
    base = base.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


# ----------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One input sample as read from a shard. `error` is a reason code when it cannot be used; `detail` explains
    it, or why a usable sample has no web caption (`web_caption` None: an image-only sample)."""

    key: str
    image: bytes | None = None
    image_ext: str = "jpg"
    web_caption: str | None = None
    synthetic: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""
    input_row: int | None = None  # index of this sample's entry in each of its Batch's `inputs` lists


def parse_sample(raw: dict[str, Any]) -> Sample:
    """Pick the image member, the web caption and any earlier synthetic captions out of a grouped tar sample."""
    sample = Sample(key=raw["__key__"])
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return _fail(sample, NO_IMAGE, f"members: {sorted(k for k in raw if not k.startswith('__'))}")
    sample.image, sample.image_ext = raw[ext], ext

    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("json member is not an object")
        except (UnicodeDecodeError, ValueError) as exc:
            return _fail(sample, BAD_JSON, error_detail(exc))
        sample.meta = meta

    # A shard written by capfilt carries its candidates; its web caption is the one marked `web`, if any (the
    # txt member then holds a synthetic caption, never the web one).
    candidates = read_candidates(sample.meta)
    sample.synthetic = [c.caption for c in candidates if c.source == "synthetic"]
    if candidates:
        web = [c.caption for c in candidates if c.source == "web"]
        sample.web_caption, absent = (web[0] if web else None), "no web caption among the capfilt candidates"
    elif "txt" in raw:
        try:
            sample.web_caption, absent = raw["txt"].decode("utf-8"), "the txt member is empty"
        except UnicodeDecodeError as exc:
            return _fail(sample, CAPTION_NOT_UTF8, error_detail(exc))
    elif isinstance(sample.meta.get("caption"), str):
        sample.web_caption, absent = sample.meta["caption"], "the json caption is empty"
    else:
        absent = "no txt member and no caption in json"
    sample.web_caption = (sample.web_caption or "").strip() or None
    if sample.web_caption is None:
        sample.detail = absent  # usable all the same: a captioner captions the image alone
    return sample


def _fail(sample: Sample, reason: str, detail: str) -> Sample:
    sample.error, sample.detail, sample.image = reason, detail, None
    return sample


class TarCutError(tarfile.ReadError):
    """The tar stopped at or inside a member header: the rest of the shard is missing."""


class _CutAwareTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly where a header is cut short or missing; this notes it on the archive, so
    that a tar cut at or inside a header reads as truncated, as one cut inside data does."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.TruncatedHeaderError:
            tar.capfilt_cut = "cut inside a member header"
            raise
        except tarfile.EmptyHeaderError:
            tar.capfilt_cut = "ends without its end-of-archive blocks"
            raise


@dataclass(frozen=True)
class MemberLimits:
    """The largest tar member read, per kind, in bytes (defaults: RunConfig's). A larger one is skipped unread
    (tarfile reads past it block by block), so one absurd member costs no memory, and its sample becomes an
    error row with the kind's own reason."""

    image: int = RunConfig.max_image_bytes
    caption: int = RunConfig.max_caption_bytes
    json: int = RunConfig.max_json_bytes

    @classmethod
    def of(cls, config: Any) -> MemberLimits:
        """From a config with `max_image_bytes`, `max_caption_bytes` and `max_json_bytes` (a RunConfig)."""
        return cls(config.max_image_bytes, config.max_caption_bytes, config.max_json_bytes)


# The member kinds a sample is made of, with their limit's option and reason; members of any other extension are
# never read (nothing uses them), only named.
_KINDS = {**{ext: ("image", "--max-image-bytes", IMAGE_TOO_LARGE) for ext in IMAGE_EXTENSIONS},
          "txt": ("caption", "--max-caption-bytes", CAPTION_TOO_LONG),
          "json": ("json", "--max-json-bytes", JSON_TOO_LARGE)}
_OVER = "__over_limit__"  # (reason, detail) of a sample's first member over its limit


def read_shard(url: str, limits: MemberLimits = MemberLimits()) -> Iterator[Sample]:
    """Stream a shard's samples in order. A truncated, empty or unreadable tar ends with one error sample
    (key "") carrying the reason; everything read before the damage is still yielded. A key seen before in the
    shard makes the later sample a `duplicate_key` error; a member over its `limits` makes its sample an error
    of that kind (image_too_large, caption_too_long, json_too_large), the member never read.

    Raises when the stream itself fails (missing file, network, a `pipe:` command exiting non-zero), which
    the caller answers by retrying the whole shard.
    """
    stream = wds.gopen(url, "rb")
    members = 0
    broken = False
    current: dict[str, Any] | None = None
    seen: set[str] = set()

    def finish(raw: dict[str, Any]) -> Sample:
        if raw["__key__"] in seen:  # a second sample under one key would overwrite the first downstream
            return Sample(key=raw["__key__"], error=DUPLICATE_KEY,
                          detail="an earlier sample of this shard has the same key")
        seen.add(raw["__key__"])
        if _OVER in raw:
            return Sample(key=raw["__key__"], error=raw[_OVER][0], detail=raw[_OVER][1])
        return parse_sample(raw)

    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CutAwareTarInfo) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:
                    continue
                ext = ext.lower()
                data, over = None, None
                if ext in _KINDS:
                    kind, option, reason = _KINDS[ext]
                    limit = getattr(limits, kind)
                    if info.size > limit:
                        over = (reason, f"its {ext} member is {info.size:,} bytes, over {option} ({limit:,})")
                    else:
                        data = tar.extractfile(info).read()
                members += 1
                # A repeated member name is a new sample under the same key, not a replacement of the last one.
                if current is not None and (current["__key__"] != key or ext in current):
                    yield finish(current)
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
                if over is not None:
                    current.setdefault(_OVER, over)
            if getattr(tar, "capfilt_cut", None):
                raise TarCutError(tar.capfilt_cut)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        broken = True
        if members or isinstance(exc, TarCutError):
            reason = TRUNCATED_TAR
        else:
            reason = EMPTY_TAR if "empty" in str(exc) else UNREADABLE_TAR
        if current is not None and reason == TRUNCATED_TAR:
            # The sample being read when the tar broke may have lost members: it is not trustworthy.
            yield Sample(key=current["__key__"], error=TRUNCATED_TAR, detail="sample cut by the end of the tar")
            current = None
        yield Sample(key="", error=reason, detail=error_detail(exc))
    finally:
        stream.close()  # a `pipe:` command that exited non-zero raises here
    if current is not None:
        yield finish(current)
    elif members == 0 and not broken:
        yield Sample(key="", error=EMPTY_TAR, detail="the tar holds no members")


# ----------------------------------------------------------------------------------------------- batches


Inputs = dict[str, torch.Tensor]  # one image's inputs for one model, as its preprocess returns them


@dataclass
class Batch:
    """Consecutive samples of one shard, in input order. `inputs[signature]` holds, for the samples without
    `error` and in their order, one `Inputs` per image from the preprocess of that signature."""

    shard: str
    index: int
    samples: list[Sample]
    inputs: dict[str, list[Inputs]]

    def pin_memory(self) -> Batch:
        # The DataLoader's pin thread calls this; without it a dataclass passes through unpinned.
        return replace(self, inputs={key: [{k: t.pin_memory() for k, t in one.items()} for one in rows]
                                     for key, rows in self.inputs.items()})


@dataclass
class ShardEnd:
    """A shard was read completely (`failed` is None), or its stream broke: then everything sent for it so
    far is void, and it is either read again from the start (`retrying`) or given up for this run."""

    shard: str
    failed: str | None = None
    retrying: bool = False


Preprocess = Callable[[Image.Image], Inputs]  # picklable: it runs in the DataLoader workers


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")  # forces the full decode, so a truncated JPEG fails here and not later


class ShardStream(IterableDataset):
    """Reads shards and yields `Batch`es and `ShardEnd`s. Each DataLoader worker reads whole shards, so decoding
    runs in parallel and a batch never mixes shards: with `claim` (URLs -> the ones this worker reads, claimed one
    at a time as it gets to them: `capfilt.bootstrap.claims.Claims`, shared with other processes and jobs too),
    whichever shard it claims next; without, shard i goes to worker i mod n."""

    def __init__(
        self,
        urls: Sequence[str],
        preprocessors: dict[str, Preprocess],
        batch_size: int,
        retries: int = 2,
        retry_wait_s: float = 1.0,
        claim: Callable[[list[str]], Iterator[str]] | None = None,
        limits: MemberLimits = MemberLimits(),
    ):
        self.urls, self.preprocessors, self.batch_size = list(urls), preprocessors, batch_size
        self.retries, self.retry_wait_s, self.claim, self.limits = retries, retry_wait_s, claim, limits

    def __iter__(self) -> Iterator[Batch | ShardEnd]:
        info = get_worker_info()
        if self.claim is not None:
            mine = self.claim(self.urls)  # lazily: a shard is claimed when this worker is ready for it
        else:
            mine = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in mine:
            yield from self._read_with_retries(url)

    def _read_with_retries(self, url: str) -> Iterator[Batch | ShardEnd]:
        name = shard_name(url)
        for attempt in range(self.retries + 1):
            try:
                yield from self._batches(name, read_shard(url, self.limits))
            except Exception as exc:  # the stream broke: missing file, network, failing pipe command
                retrying = attempt < self.retries
                yield ShardEnd(name, failed=f"{type(exc).__name__}: {exc}", retrying=retrying)
                if not retrying:
                    return
                time.sleep(self.retry_wait_s * 2**attempt)
                continue
            yield ShardEnd(name)
            return

    def _batches(self, name: str, samples: Iterator[Sample]) -> Iterator[Batch]:
        pending: list[Sample] = []
        inputs: dict[str, list[Inputs]] = {key: [] for key in self.preprocessors}
        usable = 0
        index = 0
        for sample in samples:
            if sample.error is None:
                self._preprocess(sample, inputs)
                if sample.error is None:
                    sample.input_row = usable
                    usable += 1
            if sample.error is not None:
                sample.image = None  # nothing downstream needs the bytes of a failed sample
            pending.append(sample)
            if usable == self.batch_size:
                yield Batch(name, index, pending, inputs)
                pending, inputs, usable, index = [], {key: [] for key in self.preprocessors}, 0, index + 1
        if pending:
            yield Batch(name, index, pending, inputs if usable else {})

    def _preprocess(self, sample: Sample, inputs: dict[str, list[Inputs]]) -> None:
        """Decode the sample's image and run every preprocess on it; a failure makes the sample an error."""
        try:
            image = decode_image(sample.image)
        except Exception as exc:  # PIL raises many types for bad bytes
            sample.error, sample.detail = CORRUPT_IMAGE, error_detail(exc)
            return
        mine = {}
        for key, preprocess in self.preprocessors.items():
            try:
                mine[key] = preprocess(image)
            except Exception as exc:  # a model's processor refusing an image (too small, too elongated...)
                sample.error, sample.detail = IMAGE_REJECTED, error_detail(exc)
                return
        for key, one in mine.items():  # all or nothing, so every list keeps one entry per usable sample
            inputs[key].append(one)


def _identity(item):
    return item


def die_with_parent(worker_id: int) -> None:
    """A worker of a killed (SIGKILL) run would otherwise linger, holding memory; Linux can tie it to its parent."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def stream_batches(stream: ShardStream, workers: int, pin_memory: bool = False) -> Iterator[Batch | ShardEnd]:
    """Run a ShardStream through a DataLoader so decoding and preprocessing overlap with model compute."""
    workers = min(workers, len(stream.urls))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=die_with_parent if workers else None,
        # Take each worker's batches as they come. In order, a worker waiting for a shard another process holds
        # would stall the others' ready batches, and two processes whose waiting workers each wait on a shard the
        # other's stalled worker holds would deadlock. A worker reads whole shards, so each shard's batches still
        # arrive in order, and a shard's output depends on its own batches only.
        in_order=False,
    )
    return iter(loader)
