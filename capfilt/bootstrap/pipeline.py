"""The CapFilt run: shards in, captioner and/or filter over batches, cleaned shards out; resumable.

`run` is the one entry point behind `capfilt caption`, `filter` and `bootstrap`. The captioner and scorer are
built by the caller and passed in; this module only routes batches between the reader, the models and the
writers, and keeps the per-shard books.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from capfilt.bootstrap.claims import Claims, tidy
from capfilt.bootstrap.outcome import RunSummary, input_location, write_candidates
from capfilt.bootstrap.selection import kind_of, resolve, unique_candidates
from capfilt.data import reader
from capfilt.data.caption_rules import caption_rule
from capfilt.data.reader import Batch, MemberLimits, Sample, ShardEnd, ShardStream
from capfilt.data.schema import ERROR, MISSING_CAPTION, PROBABILITY, ScoreKind, stats_path
from capfilt.data.text import clean_caption
from capfilt.data.writer import OVERWRITE_ALONE, ShardWriter, check_apart_from_inputs, prepare_output
from capfilt.errors import CapfiltError
from capfilt.launcher import current_rank
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Scorer
from capfilt.models.towers import one_tower_pass, same_vision_tower
from capfilt.models.vlm import VlmCaptioner
from capfilt.settings import RunConfig, SelectionConfig

logger = logging.getLogger(__name__)


def batch_seed(seed: int, shard: str, index: int) -> int:
    """A seed that depends only on (seed, shard, batch): a shard's captions do not depend on which run,
    worker or process produced them, so a resumed run reproduces an uninterrupted one byte for byte."""
    digest = hashlib.sha256(f"{seed}/{shard}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run(
    config: RunConfig,
    captioner: Captioner | VlmCaptioner | None = None,
    scorer: Scorer | None = None,
    selection: SelectionConfig | None = None,
) -> RunSummary:
    if captioner is None and scorer is None:
        raise CapfiltError("nothing to do: give a captioner, a filter, or both")
    selection = selection or SelectionConfig()
    kind = kind_of(scorer) if scorer is not None else PROBABILITY
    selection = resolve(selection, kind)  # the threshold recorded and applied is the kind's default if none given
    urls = reader.expand_specs(config.specs)
    out = Path(config.out)
    me = current_rank()
    if config.overwrite and me.world_size > 1:
        raise CapfiltError(OVERWRITE_ALONE)
    check_apart_from_inputs(out, [Path(p) for p in map(reader.local_file, urls) if p is not None])
    names = [reader.shard_name(u) for u in urls]
    prepare_output(out, _settings(config, captioner, scorer, selection), config.overwrite, names)
    if scorer is not None and scorer.calibration is not None and scorer.calibration.clean_text != config.clean_text:
        logger.warning(f"the calibration was fitted {'with' if scorer.calibration.clean_text else 'without'} "
                       f"--clean-text and this run scores captions {'with' if config.clean_text else 'without'}: "
                       "calibrate the way the run cleans")
    todo = [u for u in urls if not stats_path(out, reader.shard_name(u)).exists()]
    summary = RunSummary(out=str(out), shards_skipped=len(urls) - len(todo))
    if not todo:
        tidy(out, config.claim_timeout)
        return summary

    preprocessors, captioner_key, scorer_key = shared_preprocessors(captioner, scorer)
    one_tower = (captioner is not None and scorer is not None and captioner_key == scorer_key
                 and same_vision_tower(captioner.model, scorer.model))
    claims = Claims(out, config.claim_timeout).start()
    inputs = {reader.shard_name(u): input_location(u) for u in todo}  # recorded per shard, for `capfilt report`

    def open_shard(name: str) -> _OpenShard:  # publishes only while this process still holds the shard
        return _OpenShard(ShardWriter(out, name, guard=functools.partial(claims.holds, name)), inputs[name])

    stream = ShardStream(todo, preprocessors, config.batch_size, retries=config.retries, claim=claims,
                         limits=MemberLimits.of(config))
    device = (captioner or scorer).device
    started = time.perf_counter()
    open_shards: dict[str, _OpenShard] = {}
    stages = _Stages(config, selection, captioner, scorer, captioner_key, scorer_key, kind)
    view = _JobView(out, [reader.shard_name(u) for u in todo], enabled=config.progress and me.rank == 0)
    try:
        for item in reader.stream_batches(stream, config.workers, pin_memory=device.type == "cuda"):
            if isinstance(item, ShardEnd):
                shard = open_shards.pop(item.shard, None)
                if item.failed:
                    if shard is not None:
                        shard.writer.abort()  # a retry starts the shard over with a fresh writer
                    if not item.retrying:
                        summary.shards_failed[item.shard] = item.failed
                        # Released at once: processes waiting for it try it once each (a fault of this node's
                        # may not be theirs), and none waits forever for a shard nobody is doing.
                        claims.release(item.shard)
                else:
                    stats = (shard or open_shard(item.shard)).commit()
                    if stats is None:
                        logger.warning("shard %s: this process lost its claim (its heartbeat stopped for longer than "
                                       "its --claim-timeout, so another process took the shard over): its work is "
                                       "discarded and the new holder's stands", item.shard)
                    else:
                        summary.add(stats)
                        claims.release(item.shard)
                view.update(open_shards.values(), force=True)
                continue
            shard = open_shards.get(item.shard)
            if shard is None:
                shard = open_shards[item.shard] = open_shard(item.shard)
            # Captioner and filter on the same frozen tower: it runs once for the batch (bytes unchanged).
            with one_tower_pass(captioner.model, scorer.model) if one_tower else contextlib.nullcontext():
                _process(item, shard.writer, stages)
            view.update(open_shards.values())
    finally:
        for shard in open_shards.values():  # interrupted: leave no half-written shard behind
            shard.writer.abort()
        claims.close()  # releases what this process still holds (its interrupted shards)
        tidy(out, config.claim_timeout)
        view.close()
    summary.duration_s = time.perf_counter() - started
    return summary


class _JobView:
    """Rank 0's progress bar for the whole job: shards done by every process (their stats files, re-read every
    few seconds: no communication), the job's samples/s and keep rate, and tqdm's ETA."""

    def __init__(self, out: Path, names: list[str], enabled: bool, every_s: float = 5.0):
        self.out, self.pending, self.every_s = out, set(names), every_s
        self.done_read = self.done_written = 0
        self.started = self.checked = time.perf_counter()
        self.bar = tqdm(total=len(names), unit="shard", desc="shards", disable=not enabled, file=sys.stderr)

    def update(self, open_shards, force: bool = False) -> None:
        """`open_shards`: this process's unfinished shards, whose samples no stats file counts yet."""
        if self.bar.disable or not (force or time.perf_counter() - self.checked > self.every_s):
            return
        self.checked = time.perf_counter()
        for name in [n for n in self.pending if stats_path(self.out, n).exists()]:
            stats = json.loads(stats_path(self.out, name).read_text())
            self.pending.discard(name)
            self.done_read += stats["read"]
            self.done_written += stats["written"]
        self.bar.n = self.bar.total - len(self.pending)
        read = self.done_read + sum(shard.writer.stats.read for shard in open_shards)
        written = self.done_written + sum(shard.writer.stats.written for shard in open_shards)
        rate = read / max(1e-9, time.perf_counter() - self.started)
        self.bar.set_postfix_str(f"{rate:.1f} img/s, keep {written / max(1, read):.0%}")

    def close(self) -> None:
        self.bar.close()


@dataclass
class _OpenShard:
    writer: ShardWriter
    input: str = ""  # the input shard's URL or absolute path
    started: float = field(default_factory=time.perf_counter)

    def commit(self) -> dict[str, Any] | None:
        duration = time.perf_counter() - self.started
        rate = self.writer.stats.read / duration if duration > 0 else 0.0
        return self.writer.commit({"duration_s": round(duration, 3), "samples_per_s": round(rate, 2),
                                   "input": self.input})


def shared_preprocessors(captioner, scorer):
    """One preprocessing per distinct signature: captioner and filter share its results when they agree."""
    preprocessors: dict[str, Any] = {}
    keys = []
    for model in (captioner, scorer):
        if model is None:
            keys.append(None)
            continue
        key = model.preprocess.signature
        preprocessors.setdefault(key, model.preprocess)
        keys.append(key)
    return preprocessors, keys[0], keys[1]


def _settings(config: RunConfig, captioner, scorer, selection: SelectionConfig) -> dict[str, Any]:
    """What makes two runs' outputs comparable; a resume must match it exactly."""
    settings: dict[str, Any] = {"batch_size": config.batch_size, "seed": config.seed, "clean_text": config.clean_text}
    if config.caption_rules.enabled:
        # Absent when off, so that an output written before the rules existed (format 2) resumes with them off.
        settings["caption_rules"] = asdict(config.caption_rules)
    if captioner is not None:
        ignored = ("device", *getattr(captioner, "unused_settings", ()))
        settings["captioner"] = {k: v for k, v in captioner.config.__dict__.items() if k not in ignored}
    if scorer is not None:
        # No calibration key without one, so that outputs written before --calibration existed still resume;
        # with one, the fit itself (a rewritten file at the same path is another filter).
        settings["filter"] = {k: v for k, v in scorer.config.__dict__.items() if k not in ("device", "calibration")}
        if scorer.calibration is not None:
            settings["filter"]["calibration"] = asdict(scorer.calibration)
        if kind_of(scorer) != PROBABILITY:  # no key for a probability: older outputs still resume
            settings["filter"]["score_kind"] = kind_of(scorer)
        settings["selection"] = dict(selection.__dict__)
    # Limits decide which samples become errors; recorded only when not the defaults, so that outputs written
    # before the limits existed still resume.
    limits = asdict(MemberLimits.of(config))
    if limits != asdict(MemberLimits()):
        settings["member_limits"] = limits
    return settings


class FitToMemory:
    """`fit(fn, n)` runs `fn(start, stop)` (-> a list) over rows 0..n in chunks of at most `limit`. A CUDA
    out-of-memory error halves the limit, which then holds for the rest of the run, and the chunk is retried: a
    too large --batch-size costs speed, not the job. Sampling seeds follow the row offset, so the captions of a
    halved batch are reproducible but differ from an unhalved run's."""

    def __init__(self):
        self.limit: int | None = None
        self.halvings = 0

    def __call__(self, fn, n: int) -> list:
        out, start = [], 0
        while start < n:
            stop = n if self.limit is None else min(n, start + self.limit)
            try:
                out += fn(start, stop)
                start = stop
            except torch.cuda.OutOfMemoryError:
                if stop - start == 1:
                    raise
                torch.cuda.empty_cache()
                self.limit = (stop - start) // 2
                self.halvings += 1
        return out


@dataclass
class _Stages:
    """What every batch of a run goes through, built once per run."""

    config: RunConfig
    selection: SelectionConfig
    captioner: Captioner | VlmCaptioner | None
    scorer: Scorer | None
    captioner_key: str | None  # the preprocess each model's inputs come from
    scorer_key: str | None
    kind: ScoreKind = PROBABILITY  # of the filter's scores
    fit: FitToMemory = field(default_factory=lambda: FitToMemory())

    @property
    def model_ids(self) -> tuple[str | None, str | None]:
        return (self.captioner.config.model if self.captioner else None,
                self.scorer.config.model if self.scorer else None)


def _process(batch: Batch, writer: ShardWriter, stages: _Stages) -> None:
    """One batch: usable samples captioned, every candidate scored, each sample written or recorded as an error."""
    stats = writer.stats
    halvings = stages.fit.halvings
    good = _usable(batch.samples, stats, stages)
    rows = [s.input_row for s in good]

    def inputs_of(key: str):  # a list of per-image inputs; a sample that dropped out is left out
        return batch.inputs[key] if len(rows) == len(batch.inputs[key]) else [batch.inputs[key][r] for r in rows]

    new_captions: list[list[str]] = [[] for _ in good]
    if stages.captioner is not None and good:
        new_captions = _caption(batch, inputs_of(stages.captioner_key), len(good), stages)
        stats.synthetic_generated += sum(len(c) for c in new_captions)
    candidates = [unique_candidates(s.web_caption, s.synthetic + new) for s, new in zip(good, new_captions)]
    for cands in candidates:  # before scoring: a caption that fails a rule is never scored
        for c in cands:
            c.rule = caption_rule(c.caption, stages.config.caption_rules, synthetic=c.source == "synthetic")
    if stages.scorer is not None and good:
        truncated = stages.scorer.captions_truncated
        _score(inputs_of(stages.scorer_key), candidates, stages)
        stats.captions_scored += sum(c.rule is None for cands in candidates for c in cands)
        stats.captions_truncated += stages.scorer.captions_truncated - truncated
    stats.oom_halvings += stages.fit.halvings - halvings

    by_sample = {id(s): c for s, c in zip(good, candidates)}
    for sample in batch.samples:
        cands = by_sample.get(id(sample))
        if sample.error is None and not cands:  # no web caption, and the captioner's came out empty (--clean-text)
            sample.error, sample.detail = MISSING_CAPTION, f"{sample.detail}; the synthetic captions are empty"
        if sample.error is not None:
            stats.count_error(sample.error)
            writer.add_row(key=sample.key, status=ERROR, reason=sample.error, detail=sample.detail,
                           web_caption=sample.web_caption)
            continue
        write_candidates(writer, sample, cands, stages.selection, *stages.model_ids, kind=stages.kind)


def _usable(samples: list[Sample], stats, stages: _Stages) -> list[Sample]:
    """Count the batch's samples, clean their text if asked, and return those the models can use."""
    clean = stages.config.clean_text
    good = []
    for sample in samples:
        if sample.key:
            stats.read += 1
        if sample.error is None and clean:
            sample.synthetic = [clean_caption(s) for s in sample.synthetic]
            if sample.web_caption is not None:
                sample.web_caption = clean_caption(sample.web_caption) or None
                sample.detail = "" if sample.web_caption else "web caption empty after --clean-text"
        if sample.error is None and sample.web_caption is None and stages.captioner is None and not sample.synthetic:
            sample.error, sample.detail = MISSING_CAPTION, f"{sample.detail}: nothing to score"
        if sample.error is None:
            good.append(sample)
    return good


def _caption(batch: Batch, inputs, n: int, stages: _Stages) -> list[list[str]]:
    seed = stages.config.seed
    seed = None if seed is None else batch_seed(seed, batch.shard, batch.index)
    captions = stages.fit(lambda a, b: stages.captioner(inputs[a:b], seed=None if seed is None else seed + a), n)
    if stages.config.clean_text:
        captions = [[clean_caption(c) for c in caps] for caps in captions]
    return captions


def _score(inputs, candidates, stages: _Stages) -> None:
    """Score the candidates that passed the caption rules; an image none of whose captions did is not scored."""
    passing = [[c for c in cands if c.rule is None] for cands in candidates]
    rows = [i for i, cands in enumerate(passing) if cands]
    if not rows:
        return
    if len(rows) < len(passing):
        inputs = [inputs[i] for i in rows]  # per-image inputs: keep the images that still have a caption
    texts = [[c.caption for c in passing[i]] for i in rows]
    scores = stages.fit(lambda a, b: stages.scorer(inputs[a:b], texts[a:b]), len(texts))
    for i, row in zip(rows, scores):
        for c, score in zip(passing[i], row):
            c.score = score
