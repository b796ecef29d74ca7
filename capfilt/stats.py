"""`capfilt stats`: totals, keep rates, score quantiles and error reasons of a finished (or partial) output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from capfilt.errors import CapfiltError
from capfilt.writer import MANIFEST, recorded_shards, shard_files, stats_path

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class OutputReport:
    out: str
    shards_done: int = 0
    shards_unfinished: list[str] = field(default_factory=list)
    read: int = 0
    written: int = 0
    dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    web_scored: int = 0
    web_kept: int = 0
    synthetic_generated: int = 0
    synthetic_scored: int = 0
    synthetic_kept: int = 0
    oom_halvings: int = 0
    web_score_quantiles: dict[float, float] = field(default_factory=dict)
    synthetic_score_quantiles: dict[float, float] = field(default_factory=dict)


def summarize(out: Path) -> OutputReport:
    if not out.is_dir():
        raise CapfiltError(f"{out} is not a directory")
    report = OutputReport(out=str(out))
    shards = recorded_shards(out)  # the manifest's, not every *_stats.json: other files there are not ours
    if shards is None:
        raise CapfiltError(f"{out} holds no capfilt output (no {MANIFEST})")
    done = set()
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
        for reason, n in stats["errors"].items():
            report.errors[reason] = report.errors.get(reason, 0) + n
        rows = pq.read_table(out / f"{stats['shard']}.parquet", columns=["web_score", "synthetic_scores"])
        web = [s for s in rows.column("web_score").to_pylist() if s is not None]
        synthetic = [s for group in rows.column("synthetic_scores").to_pylist() if group for s in group]
        web_scores += web
        synthetic_scores += synthetic
    report.web_scored, report.synthetic_scored = len(web_scores), len(synthetic_scores)
    report.web_score_quantiles = _quantiles(web_scores)
    report.synthetic_score_quantiles = _quantiles(synthetic_scores)
    report.shards_unfinished = sorted(s for s in shards if s not in done
                                      and any((out / name).exists() for name in shard_files(s)))
    return report


def _quantiles(values: list[float]) -> dict[float, float]:
    if not values:
        return {}
    return {q: float(v) for q, v in zip(QUANTILES, np.quantile(np.asarray(values), QUANTILES))}


def _rate(n: int, d: int) -> str:
    return f"{n:,}/{d:,} ({n / d:.1%})" if d else "-"


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
    if r.web_scored:
        lines.append(f"web kept         {_rate(r.web_kept, r.web_scored)}")
    if r.synthetic_generated:
        lines.append(f"synthetic made   {r.synthetic_generated:,}")
    if r.synthetic_scored:
        lines.append(f"synthetic kept   {_rate(r.synthetic_kept, r.synthetic_scored)}")
    if r.oom_halvings:
        lines.append(f"OOM halvings     {r.oom_halvings:,} (batches retried in halves; lower --batch-size)")
    for name, qs in (("web score", r.web_score_quantiles), ("synthetic score", r.synthetic_score_quantiles)):
        if qs:
            lines.append(f"{name:<16} " + "  ".join(f"p{int(q * 100)}={v:.3f}" for q, v in qs.items()))
    return "\n".join(lines)


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """ROC AUC: the chance that a positive scores above a negative, ties counting half (Mann-Whitney U over
    the pair count), so it needs no threshold. nan when either side is empty."""
    if not positives or not negatives:
        return float("nan")
    ranked = sorted([(v, 1) for v in positives] + [(v, 0) for v in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # tied values share their mean rank
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(label for _, label in ranked[i:j]) * (i + j + 1) / 2
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class NoiseReport:
    """The filter against planted ground truth, on web captions: `removed` = not among the kept captions."""

    noisy: int
    clean: int
    noisy_removed: int
    clean_kept: int
    examples: list[dict] = field(default_factory=list)  # human caption beside the synthetic ones

    @property
    def precision(self) -> float:
        """Of the web captions the filter removed, the share that were planted noise."""
        removed = self.noisy_removed + (self.clean - self.clean_kept)
        return self.noisy_removed / removed if removed else float("nan")

    @property
    def recall(self) -> float:
        """Of the planted noisy captions, the share the filter removed."""
        return self.noisy_removed / self.noisy if self.noisy else float("nan")

    def format(self) -> str:
        lines = [f"planted noisy captions removed  {self.noisy_removed}/{self.noisy}  (recall {self.recall:.2f})",
                 f"clean captions kept             {self.clean_kept}/{self.clean}",
                 f"precision of the removals       {self.precision:.2f}"]
        for ex in self.examples:
            lines.append(f"  web: {ex['web']!r}{'  [planted noise]' if ex['noisy'] else ''}")
            lines += [f"    synthetic: {c!r} ({s:.2f}{', kept' if k else ''})" for c, s, k in ex["synthetic"]]
        return "\n".join(lines)


def noise_report(specs: list[str], out: Path, is_noisy, examples: int = 3) -> NoiseReport:
    """Compare an output directory with the ground truth in its input shards' json (`is_noisy(meta)`)."""
    from capfilt.reader import expand_specs, read_shard, shard_name

    truth = {}
    for url in expand_specs(specs):
        for sample in read_shard(url):
            if sample.error is None:
                truth[(shard_name(url), sample.key)] = bool(is_noisy(sample.meta))
    report = NoiseReport(0, 0, 0, 0)
    for path in sorted(out.glob("*.parquet")):
        shard = path.name[: -len(".parquet")]
        for row in pq.read_table(path).to_pylist():
            noisy = truth.get((shard, row["key"]))
            if noisy is None or row["status"] == "error":
                continue
            kept = row["web_caption"] in (row["kept_captions"] or [])
            report.noisy += noisy
            report.clean += not noisy
            report.noisy_removed += noisy and not kept
            report.clean_kept += (not noisy) and kept
            if len(report.examples) < examples and row["synthetic_captions"]:
                report.examples.append({"web": row["web_caption"], "noisy": noisy, "synthetic": list(zip(
                    row["synthetic_captions"], row["synthetic_scores"] or [float("nan")] * 9,
                    [c in (row["kept_captions"] or []) for c in row["synthetic_captions"]]))})
    return report
