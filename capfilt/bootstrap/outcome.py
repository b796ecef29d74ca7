"""What a run writes for each sample that comes through, and what it reports when done: shared by `run`, which
scores with the models, and `capfilt select`, which takes the scores a run recorded. No model and no
transformers here, so `capfilt select` loads neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from capfilt.bootstrap.selection import select
from capfilt.data.reader import Sample, local_file
from capfilt.data.schema import (
    ALL_BELOW_THRESHOLD,
    ALL_FAILED_RULES,
    DROPPED,
    OK,
    PROBABILITY,
    ScoreKind,
    capfilt_block,
    read_block,
)
from capfilt.data.writer import ShardWriter
from capfilt.settings import SelectionConfig


@dataclass
class RunSummary:
    """What this invocation did; `capfilt.bootstrap.stats.summarize(out)` reports on the whole output."""

    out: str
    shards_skipped: int  # already done by an earlier run
    shards_done: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    written: int = 0
    duration_s: float = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        self.shards_done += 1
        self.samples += stats["read"]
        self.written += stats["written"]


def input_location(url: str) -> str:
    """A shard URL as the stats record it: local paths made absolute, so the output can be read from anywhere."""
    return os.path.abspath(url) if local_file(url) == url else url


def write_candidates(writer: ShardWriter, sample: Sample, cands, selection: SelectionConfig,
                     captioner_id: str | None, filter_id: str | None, kind: ScoreKind = PROBABILITY) -> None:
    """A good sample's parquet row, and its tar sample unless dropped; selects first when it was scored
    (`filter_id` given). `run` and `capfilt select` both write through here, so their bytes agree."""
    stats = writer.stats
    scored = filter_id is not None
    kept = select(cands, selection) if scored else [c for c in cands if c.rule is None]
    web = next((c for c in cands if c.source == "web"), None)  # None: an image-only sample
    synthetic = [c for c in cands if c.source == "synthetic"]
    row = dict(key=sample.key, detail=sample.detail or None, web_caption=web.caption if web else None,
               web_score=web.score if web else None, synthetic_captions=[c.caption for c in synthetic],
               synthetic_scores=[c.score for c in synthetic] if scored else None,
               kept_captions=[c.caption for c in kept] if scored else None,
               web_rule=web.rule if web else None, synthetic_rules=[c.rule for c in synthetic])
    if not kept:
        stats.dropped += 1
        failed_rules = all(c.rule is not None for c in cands)  # none was scored: not "below threshold"
        writer.add_row(status=DROPPED, reason=ALL_FAILED_RULES if failed_rules else ALL_BELOW_THRESHOLD, **row)
        return
    stats.written += 1
    if scored:
        stats.web_kept += int(web is not None and bool(web.kept))
        stats.synthetic_kept += sum(bool(c.kept) for c in synthetic)
    writer.write_sample(sample.key, sample.image, sample.image_ext, kept[0].caption,
                        output_meta(sample, cands, captioner_id, filter_id, selection, kind))
    writer.add_row(status=OK, **row)


def output_meta(sample: Sample, cands, captioner_id: str | None, filter_id: str | None,
                selection: SelectionConfig, kind: ScoreKind = PROBABILITY) -> dict[str, Any]:
    captioner = captioner_id if captioner_id is not None else read_block(sample.meta).get("captioner")
    return {**sample.meta, "capfilt": capfilt_block(cands, captioner, filter_id, dict(selection.__dict__), kind)}
