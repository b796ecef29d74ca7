"""Image-caption pairs for pre-training and evaluation, read from shards (capfilt's own or img2dataset's).

Training streams forever: each (rank, DataLoader worker) draws shards at random with replacement from its
own seeded generator (WebDataset's "resampled" mode: no epoch bookkeeping, ranks and workers never wait on
each other, and a restarted run simply draws afresh), passes samples through a shuffle buffer and yields
fixed-size batches. Evaluation reads every sample once, in order.

A shard written by `capfilt bootstrap` offers several kept captions per image; one is drawn per use, as
BLIP-2 does with its top-two. Samples that cannot be used (bad image, no caption...) are skipped and
counted in the batch that follows them, so the training log shows them.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.data.reader import Sample, decode_image, die_with_parent, read_shard, shard_name
from capfilt.data.schema import CORRUPT_IMAGE, MISSING_CAPTION, recorded_kept
from capfilt.data.text import clean_caption
from capfilt.errors import CapfiltError


@dataclass
class PairBatch:
    """pixel_values: (B, 3, H, W); captions: B cleaned captions; sample_ids: (B,) int64, equal for the same
    image; skipped: unusable samples met since the previous batch (by reason); inputs: the model's keyword
    arguments when the stream was given a `tokenize` (made in the worker, off the training process)."""

    pixel_values: torch.Tensor
    captions: list[str]
    sample_ids: torch.Tensor
    keys: list[str]
    skipped: dict[str, int]
    inputs: dict[str, torch.Tensor] | None = None

    def pin_memory(self) -> PairBatch:
        # The DataLoader's pin thread calls this; without it a dataclass passes through unpinned.
        pinned: dict[int, torch.Tensor] = {}

        def pin(tensor: torch.Tensor) -> torch.Tensor:  # `inputs` holds pixel_values again: copy it once
            if id(tensor) not in pinned:
                pinned[id(tensor)] = tensor.pin_memory()
            return pinned[id(tensor)]

        inputs = None if self.inputs is None else {name: pin(tensor) for name, tensor in self.inputs.items()}
        return replace(self, pixel_values=pin(self.pixel_values), sample_ids=pin(self.sample_ids), inputs=inputs)


def captions_of(sample: Sample) -> list[str]:
    """The captions a sample offers for training: the kept ones of a `capfilt bootstrap` output, else its
    web caption."""
    kept = recorded_kept(sample.meta)
    if kept is not None:
        return kept
    return [sample.web_caption] if sample.web_caption else []


def sample_id(url: str, key: str) -> int:
    """An image's id for ITM's same-image rule and the frozen-feature cache: by the shard's whole URL, since two
    shards of one name (img2dataset's 00000.tar in two folders) repeat each other's keys."""
    return int.from_bytes(hashlib.sha1(f"{url}/{key}".encode()).digest()[:7], "big")


class PairStream(IterableDataset):
    """Batches of (image, caption). `resampled`: endless, random shards per (rank, worker), shuffled through
    a buffer of `shuffle_buffer` samples; otherwise every sample once in shard order (rank r reads shards
    r, r+R, ...; each worker a share of those)."""

    def __init__(self, urls: Sequence[str], transform: Callable, batch_size: int, *, resampled: bool,
                 shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 drop_last: bool = True, tokenize: Callable[[PairBatch], dict] | None = None):
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.rank, self.world_size, self.epoch, self.drop_last = rank, world_size, epoch, drop_last
        self.tokenize = tokenize

    def __iter__(self) -> Iterator[PairBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        if self.resampled:
            pairs = _shuffled(self._resampled_pairs(rng), self.shuffle_buffer, rng)
        else:
            mine = self.urls[self.rank :: self.world_size][worker::workers]
            pairs = (p for url in mine for p in self._pairs(url, rng))
        yield from self._batches(pairs)

    def _resampled_pairs(self, rng: random.Random) -> Iterator[tuple]:
        empty_draws = 0
        while True:
            got = False
            for pair in self._pairs(rng.choice(self.urls), rng):
                got = got or pair[0] is not None
                yield pair
            empty_draws = 0 if got else empty_draws + 1
            if empty_draws > 10 * len(self.urls):
                raise CapfiltError("no usable image-caption pairs in any shard (a filter output that kept nothing?)")

    def _pairs(self, url: str, rng: random.Random) -> Iterator[tuple]:
        """(image, caption, sample id, key) per usable sample; (None, reason) per unusable one."""
        name = shard_name(url)
        try:
            samples = read_shard(url)
            for sample in samples:
                captions = captions_of(sample) if sample.error is None else []
                if sample.error is not None or not captions:
                    yield None, sample.error or ("no_kept_caption" if sample.web_caption or sample.synthetic
                                                 else MISSING_CAPTION)
                    continue
                try:
                    image = decode_image(sample.image)
                except Exception:  # PIL raises many types for bad bytes
                    yield None, CORRUPT_IMAGE
                    continue
                yield image, clean_caption(rng.choice(captions)), sample_id(url, sample.key), f"{name}/{sample.key}"
        except Exception as exc:  # the stream broke (missing file, network): skip the shard, say so
            yield None, f"unreadable_shard: {type(exc).__name__}"

    def _batches(self, pairs: Iterator[tuple]) -> Iterator[PairBatch]:
        batch: list[tuple] = []
        skipped: Counter[str] = Counter()
        for pair in pairs:
            if pair[0] is None:
                skipped[pair[1]] += 1
                continue
            batch.append(pair)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped)
                batch, skipped = [], Counter()
        if batch and not self.drop_last:
            yield self._collate(batch, skipped)
        elif skipped:
            yield PairBatch(torch.empty(0), [], torch.empty(0, dtype=torch.long), [], skipped)

    def _collate(self, batch: list[tuple], skipped: dict[str, int]) -> PairBatch:
        images, captions, ids, keys = zip(*batch)
        out = PairBatch(self.transform(list(images)), list(captions), torch.tensor(ids, dtype=torch.long),
                        list(keys), skipped)
        if self.tokenize is not None:
            out.inputs = self.tokenize(out)
        return out


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Uniform draws from a buffer of `size` items, refilled from `items` (WebDataset's shuffle)."""
    buffer: list[Any] = []
    for item in items:
        if item[0] is None:  # skip markers pass straight through
            yield item
            continue
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _as_is(batch: PairBatch) -> PairBatch:
    return batch


def load_pairs(stream: PairStream, workers: int, pin_memory: bool = False) -> Iterator[PairBatch]:
    """Decode, preprocess and tokenize in `workers` processes while the model computes."""
    if workers:  # the tokenizer's own threads would be forked mid-use; the workers are the parallelism
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, collate_fn=_as_is,
                        worker_init_fn=die_with_parent if workers else None)
    return iter(loader)
