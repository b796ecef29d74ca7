"""An output against the planted ground truth in its inputs' json (the demo corpus's `capfilt_demo.noisy`,
`capfilt synth`'s `synth.noisy`): how many of the planted wrong captions the filter removed, at what precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.data.reader import expand_specs, read_shard, shard_name
from capfilt.data.schema import ERROR


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
            lines += [f"    synthetic: {c!r} ({'unscored' if s is None else f'{s:.2f}'}{', kept' if k else ''})"
                      for c, s, k in ex["synthetic"]]  # unscored: a caption rule dropped it
        return "\n".join(lines)


def noise_report(specs: list[str], out: Path, is_noisy, examples: int = 3) -> NoiseReport:
    """Compare an output directory with the ground truth in its input shards' json (`is_noisy(meta)`)."""
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
            if noisy is None or row["status"] == ERROR:
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
