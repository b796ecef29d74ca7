"""`capfilt select`: re-apply a selection policy to the input shards with the scores a run recorded, no models.

The input shards are read again (the image bytes and json go out as they came in); each sample's candidates and
scores come from the recorded run's parquet row, and go through the same selection and writer as in `run`, so
the output equals a full run at the new settings byte for byte (`_stats.json` timings aside).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from capfilt.bootstrap.fraction import FractionThreshold, fraction_threshold
from capfilt.bootstrap.outcome import RunSummary, input_location, write_candidates
from capfilt.data import reader
from capfilt.data.schema import (
    ERROR,
    MANIFEST,
    NO_RECORDED_SCORES,
    is_shard_temporary,
    row_candidates,
    score_kind,
    stats_path,
)
from capfilt.data.text import clean_caption
from capfilt.data.writer import ShardWriter, check_apart_from_inputs, prepare_output
from capfilt.errors import CapfiltError
from capfilt.settings import SelectConfig, SelectionConfig

log = logging.getLogger(__name__)


def recorded_settings(source: Path) -> dict[str, Any]:
    """The manifest settings of a run that scored its captions; a CapfiltError otherwise."""
    manifest = source / MANIFEST
    if not manifest.is_file():
        raise CapfiltError(f"{source} holds no capfilt output (no {MANIFEST})")
    settings = json.loads(manifest.read_text()).get("settings", {})
    if "filter" not in settings:
        raise CapfiltError(f"{source} recorded no scores (written by `capfilt caption`): nothing to select from")
    return settings


def resolve_selection(config: SelectConfig, source: Path, settings: dict[str, Any], urls: list[str]
                      ) -> tuple[SelectionConfig, FractionThreshold | None]:
    """The selection to apply: the recorded run's, with the command's changes; under --fraction, the threshold
    worked out from the recorded scores of `urls`' shards (logged)."""
    recorded = settings["selection"]
    threshold, fraction = recorded["threshold"] if config.threshold is None else config.threshold, None
    if config.fraction is not None:
        names = [reader.shard_name(u) for u in urls]
        fraction = fraction_threshold([source / f"{n}.parquet" for n in names if stats_path(source, n).exists()],
                                      config.fraction)
        log.info(fraction.describe())
        threshold = fraction.threshold
    try:
        selection = SelectionConfig(
            policy=config.policy or recorded["policy"],
            threshold=threshold,
            keep_top=recorded["keep_top"] if config.keep_top is None else config.keep_top,
        )
    except CapfiltError as exc:
        if fraction is None:
            raise
        raise CapfiltError(f"{fraction.describe()}, which a selection cannot take ({exc}): choose another "
                           "--fraction") from None
    return selection, fraction


def reselect(config: SelectConfig) -> RunSummary:
    source, out = Path(config.source), Path(config.out)
    settings = recorded_settings(source)
    if out.resolve() == source.resolve():
        raise CapfiltError("--out must differ from --from: the recorded run is never altered")
    urls = reader.expand_specs(config.specs)
    selection, fraction = resolve_selection(config, source, settings, urls)
    new_settings = {**settings, "selection": dict(selection.__dict__), "selected_from": str(source.resolve())}
    if fraction is not None:
        new_settings["fraction"] = fraction.as_dict()
    check_apart_from_inputs(out, [Path(p) for p in map(reader.local_file, urls) if p is not None])
    prepare_output(out, new_settings, config.overwrite, [reader.shard_name(u) for u in urls])
    todo = [u for u in urls if not stats_path(out, reader.shard_name(u)).exists()]
    summary = RunSummary(out=str(out), shards_skipped=len(urls) - len(todo))
    ids = ((settings.get("captioner") or {}).get("model"), settings["filter"]["model"])
    limits = reader.MemberLimits(**settings.get("member_limits", {}))  # the recorded run's: the same error rows
    started = time.perf_counter()
    for url in tqdm(todo, unit="shard", desc="shards", disable=not config.progress):
        name = reader.shard_name(url)
        try:
            stats = _select_shard(url, source, out, selection, ids, bool(settings.get("clean_text")),
                                  score_kind(settings), limits)
        except Exception as exc:  # the input stream broke (missing file, network): the shard is redone next time
            log.warning("shard %s failed: %s", name, exc)
            summary.shards_failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        summary.add(stats)
    summary.duration_s = time.perf_counter() - started
    return summary


def _recorded_rows(source: Path, name: str) -> tuple[dict[str, deque], dict[str, Any] | None]:
    """A finished recorded shard's rows by key (in order: a repeated key matches its rows one by one), and its
    stats; nothing for a shard the recorded run did not finish."""
    if not stats_path(source, name).exists():
        return {}, None
    rows: dict[str, deque] = defaultdict(deque)
    for row in pq.read_table(source / f"{name}.parquet").to_pylist():
        if row["key"]:
            rows[row["key"]].append(row)
    return rows, json.loads(stats_path(source, name).read_text())


def _select_shard(url, source: Path, out: Path, selection: SelectionConfig, ids, clean_text: bool, kind,
                  limits: reader.MemberLimits) -> dict:
    name = reader.shard_name(url)
    rows, recorded_stats = _recorded_rows(source, name)
    # `select` is one process with no claims: a temporary file of this shard is a killed attempt's, and with
    # names unique per attempt nothing else would ever remove it.
    for entry in os.scandir(out):
        if is_shard_temporary(entry.name, name):
            os.unlink(entry.path)
    writer = ShardWriter(out, name)
    stats, began = writer.stats, time.perf_counter()
    if recorded_stats is not None:
        stats.synthetic_generated = recorded_stats["synthetic_generated"]  # the captioner's work, not redone here
        stats.captions_truncated = recorded_stats.get("captions_truncated", 0)  # as the filter read them
    try:
        for sample in reader.read_shard(url, limits):
            if sample.key:
                stats.read += 1
            cands = None
            if sample.error is None:
                recorded = rows[sample.key].popleft() if rows.get(sample.key) else None
                cands = _recorded_candidates(sample, recorded, recorded_stats is not None, source, clean_text)
            if sample.error is not None:
                stats.count_error(sample.error)
                writer.add_row(key=sample.key, status=ERROR, reason=sample.error, detail=sample.detail,
                               web_caption=sample.web_caption)
                continue
            stats.captions_scored += sum(c.rule is None for c in cands)  # a rule-dropped one was never scored
            write_candidates(writer, sample, cands, selection, *ids, kind=kind)
    except BaseException:
        writer.abort()
        raise
    duration = time.perf_counter() - began
    return writer.commit({"duration_s": round(duration, 3),
                          "samples_per_s": round(stats.read / duration, 2) if duration > 0 else 0.0,
                          "input": input_location(url)})


def _recorded_candidates(sample, row, shard_done: bool, source: Path, clean_text: bool) -> list | None:
    """A sample's scored candidates from its recorded row; or None, with `sample.error` set: the recorded
    run's own error (corrupt image...), or NO_RECORDED_SCORES when scores are missing or belong elsewhere."""
    if row is None:
        why = "no row for this key" if shard_done else "the shard is not finished there"
        sample.error, sample.detail = NO_RECORDED_SCORES, f"{source}: {why}"
        return None
    if row["status"] == ERROR:  # e.g. corrupt_image: found by decoding, which this command does not do
        sample.error, sample.detail, sample.web_caption = row["reason"], row["detail"], row["web_caption"]
        return None
    web = sample.web_caption
    if clean_text and web is not None:
        web = clean_caption(web) or None  # as `run` cleans it
    scores, synthetic = row["synthetic_scores"], row["synthetic_captions"] or []
    cands = row_candidates(row)
    if row["web_caption"] != web:
        sample.error, sample.detail = NO_RECORDED_SCORES, f"{source}: its row holds another web caption"
    elif scores is None or len(scores) != len(synthetic) or not cands or \
            any(c.score is None and c.rule is None for c in cands):  # a caption rule's drop is never scored
        sample.error, sample.detail = NO_RECORDED_SCORES, f"{source}: its row lacks scores"
    else:
        sample.detail = row["detail"] or ""  # e.g. why an image-only sample has no web caption
        return cands
    return None
