"""`capfilt stats`: totals, keep rates, score quantiles and error reasons of a finished (or partial) output."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from capfilt.bootstrap.claims import ClaimView, survey
from capfilt.data.schema import MANIFEST, PROBABILITY, SCORE_LABELS, ScoreKind, score_kind, stats_path
from capfilt.data.writer import recorded_shards, unfinished_shards
from capfilt.errors import CapfiltError
from capfilt.settings import RunConfig

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ROW_SCORES = ("web_score", "synthetic_scores", "web_rule", "synthetic_rules")


@dataclass
class OutputReport:
    out: str
    shards_done: int = 0
    shards_unfinished: list[str] = field(default_factory=list)
    claims: list[ClaimView] = field(default_factory=list)  # shards in progress (and stale claims) now
    read: int = 0
    written: int = 0
    dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # a plain dict: dataclasses.asdict mangles a Counter
    web_scored: int = 0
    web_kept: int = 0
    synthetic_generated: int = 0
    synthetic_scored: int = 0
    synthetic_kept: int = 0
    captions_truncated: int = 0  # scored captions longer than the filter reads, cut
    oom_halvings: int = 0
    caption_rules: dict[str, int] = field(default_factory=dict)  # captions each rule dropped, web and synthetic
    score_kind: ScoreKind = PROBABILITY
    web_score_quantiles: dict[float, float] = field(default_factory=dict)
    synthetic_score_quantiles: dict[float, float] = field(default_factory=dict)


def summarize(out: Path) -> OutputReport:
    if not out.is_dir():
        raise CapfiltError(f"{out} is not a directory")
    report = OutputReport(out=str(out))
    shards = recorded_shards(out)  # the manifest's, not every *_stats.json: other files there are not ours
    if shards is None:
        raise CapfiltError(f"{out} holds no capfilt output (no {MANIFEST})")
    report.score_kind = score_kind(json.loads((out / MANIFEST).read_text()).get("settings", {}))
    done = set()
    errors: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    web_scores, synthetic_scores = [], []
    for path in (stats_path(out, shard) for shard in shards):
        if not path.exists():
            continue
        stats = json.loads(path.read_text())
        done.add(stats["shard"])
        report.shards_done += 1
        for name in ("read", "written", "dropped", "web_kept", "synthetic_generated", "synthetic_kept"):
            setattr(report, name, getattr(report, name) + stats[name])
        report.oom_halvings += stats.get("oom_halvings", 0)  # absent from stats written before it existed
        report.captions_truncated += stats.get("captions_truncated", 0)  # likewise
        errors.update(stats["errors"])
        parquet = out / f"{stats['shard']}.parquet"
        names = pq.read_schema(parquet).names
        rows = pq.read_table(parquet, columns=[c for c in ROW_SCORES if c in names])  # format 2: no rule columns
        web = [s for s in rows.column("web_score").to_pylist() if s is not None]
        # A caption a rule dropped has no score (None), counted by its rule instead.
        synthetic = [s for group in rows.column("synthetic_scores").to_pylist() if group
                     for s in group if s is not None]
        if "web_rule" in names:
            rules.update(r for r in rows.column("web_rule").to_pylist() if r is not None)
            rules.update(r for group in rows.column("synthetic_rules").to_pylist() if group for r in group if r)
        web_scores += web
        synthetic_scores += synthetic
    report.errors = dict(errors)
    report.caption_rules = dict(rules)
    report.web_scored, report.synthetic_scored = len(web_scores), len(synthetic_scores)
    report.web_score_quantiles = _quantiles(web_scores)
    report.synthetic_score_quantiles = _quantiles(synthetic_scores)
    report.shards_unfinished = unfinished_shards(out, shards, done)
    report.claims = [c for c in survey(out, RunConfig.claim_timeout) if c.shard not in done]
    return report


def _quantiles(values: list[float]) -> dict[float, float]:
    if not values:
        return {}
    return {q: float(v) for q, v in zip(QUANTILES, np.quantile(np.asarray(values), QUANTILES))}


def _rate(n: int, d: int) -> str:
    return f"{n:,}/{d:,} ({n / d:.1%})" if d else "-"


def _claim(c: ClaimView) -> str:
    beat = "holder gone" if c.heartbeat_age_s is None else f"heartbeat {c.heartbeat_age_s:,.0f}s ago"
    return f"{c.holder}, {beat}"


def format_report(r: OutputReport) -> str:
    lines = [
        f"output           {r.out}",
        f"shards done      {r.shards_done}"
        + (f"   unfinished: {', '.join(r.shards_unfinished)}" if r.shards_unfinished else ""),
        f"samples read     {r.read:,}",
        f"samples written  {_rate(r.written, r.read)}",
        f"samples dropped  {r.dropped:,}",
        f"errors           {sum(r.errors.values()):,}"
        + "".join(f"\n  {k:<16} {v:,}" for k, v in sorted(r.errors.items())),
    ]
    if r.caption_rules:
        lines.append(f"caption rules    {sum(r.caption_rules.values()):,} captions dropped before scoring"
                     + "".join(f"\n  {k:<20} {v:,}" for k, v in sorted(r.caption_rules.items())))
    live = [c for c in r.claims if not c.stale]
    if live:
        lines.append(f"in progress      {len(live)}" + "".join(f"\n  {c.shard:<16} {_claim(c)}" for c in live))
    stale = [c for c in r.claims if c.stale]
    if stale:
        lines.append(f"stale claims     {len(stale)} (their holders stopped renewing them: the next process on this "
                     "--out takes them over)" + "".join(f"\n  {c.shard:<16} {_claim(c)}" for c in stale))
    if r.web_scored:
        lines.append(f"web kept         {_rate(r.web_kept, r.web_scored)}")
    if r.synthetic_generated:
        lines.append(f"synthetic made   {r.synthetic_generated:,}")
    if r.synthetic_scored:
        lines.append(f"synthetic kept   {_rate(r.synthetic_kept, r.synthetic_scored)}")
    if r.captions_truncated:
        lines.append(f"captions cut     {r.captions_truncated:,} (longer than the filter reads: scored on their "
                     "first tokens, as DataComp scores CLIP's)")
    if r.oom_halvings:
        lines.append(f"OOM halvings     {r.oom_halvings:,} (batches retried in halves; lower --batch-size)")
    if r.web_scored or r.synthetic_scored:
        lines.append(f"scores are       {SCORE_LABELS[r.score_kind]}")
    for name, qs in (("web score", r.web_score_quantiles), ("synthetic score", r.synthetic_score_quantiles)):
        if qs:
            lines.append(f"{name:<16} " + "  ".join(f"p{int(q * 100)}={v:.3f}" for q, v in qs.items()))
    return "\n".join(lines)
