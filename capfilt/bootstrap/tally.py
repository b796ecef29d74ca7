"""The counting half of `capfilt report`: one streaming pass over an output's stats and parquet files into
fixed-size counters (histogram bins, a threshold grid, seeded gallery reservoirs), so memory does not grow with
the corpus. `capfilt/bootstrap/report.py` draws and renders what they hold.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from capfilt.data.schema import (
    COSINE,
    DROPPED,
    ERROR,
    MANIFEST,
    OK,
    PROBABILITY,
    ScoreKind,
    score_kind,
    stats_path,
)
from capfilt.data.writer import recorded_shards, unfinished_shards
from capfilt.errors import CapfiltError

# Where inputs carry planted noise: the demo corpus (`shards/build_demo.py`) and `capfilt synth`.
GROUND_TRUTH_FIELDS = (("capfilt_demo", "noisy"), ("synth", "noisy"))
GRID_STEP = 0.01  # threshold sweep resolution; the run's own threshold is added to the grid exactly
ROC_POINTS = 1001
TRUTH_PROBE = 3  # shards read for ground truth before concluding the corpus has none
HIST_BINS = 40  # per unit of score
# The lowest score each kind can take (a probability's 0, a cosine's -1): the histograms' and the ROC's range.
# Thresholds stay in [0, 1] for both (a negative cosine threshold keeps nearly everything).
LOWEST = {PROBABILITY: 0.0, COSINE: -1.0}
BATCH_ROWS = 4096
COLUMNS = ["key", "status", "reason", "detail", "web_caption", "web_score", "synthetic_captions",
           "synthetic_scores", "kept_captions"]
RULE_COLUMNS = ["web_rule", "synthetic_rules"]  # format 3 on: the caption rule that dropped each caption


class AtLeast:
    """For a fixed ascending grid of thresholds t: how many added values are >= t, without keeping the values."""

    def __init__(self, thresholds: np.ndarray):
        self.thresholds = thresholds
        self._hits = np.zeros(len(thresholds) + 1, dtype=np.int64)

    def add(self, values: Iterable[float]) -> None:
        values = np.asarray(list(values), dtype=np.float64)
        if values.size:
            # side="right": a value equal to a threshold passes it (the policies keep score >= threshold).
            self._hits += np.bincount(np.searchsorted(self.thresholds, values, side="right"),
                                      minlength=len(self._hits))

    def counts(self) -> np.ndarray:
        """counts()[j] = number of values >= thresholds[j]."""
        return np.cumsum(self._hits[::-1])[::-1][1:]


def threshold_grid(run_threshold: float) -> np.ndarray:
    grid = np.round(np.arange(0, 1 + GRID_STEP / 2, GRID_STEP), 10)
    return np.unique(np.append(grid, run_threshold))


def effective_thresholds(scores: list[float], policy: str, keep_top: int) -> list[float | None]:
    """Per candidate (web first), the highest threshold at which the policy still keeps it; None: never kept.

    Under blip2 a candidate is kept when its score passes and fewer than keep_top candidates rank before it;
    those rank before it have higher scores, so pass too: its rank does not depend on the threshold. Ranks
    break ties as `selection.select` does (input order, web first)."""
    if policy != "blip2":
        return list(scores)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = {i: r for r, i in enumerate(order)}
    return [s if rank[i] < keep_top else None for i, s in enumerate(scores)]


@dataclass
class Sweep:
    """Keep counts against the threshold under one policy, and the filter against ground truth."""

    thresholds: np.ndarray
    policy: str
    keep_top: int
    lowest: float = 0.0  # the lowest score the filter gives: the ROC grid's range
    images: int = 0
    web: int = 0
    synthetic: int = 0
    noisy: int = 0
    clean: int = 0

    def __post_init__(self):
        t = self.thresholds
        self.images_kept, self.web_kept, self.synthetic_kept = AtLeast(t), AtLeast(t), AtLeast(t)
        self.noisy_web_kept, self.clean_web_kept = AtLeast(t), AtLeast(t)
        self.roc_grid = np.linspace(self.lowest, 1, ROC_POINTS)
        self.noisy_scores, self.clean_scores = AtLeast(self.roc_grid), AtLeast(self.roc_grid)

    def add(self, web_score: float | None, synthetic_scores: list[float], noisy: bool | None = None) -> None:
        """One scored sample; `web_score` None: an image-only sample (synthetic captions alone), or a web caption
        a caption rule dropped, as a None among `synthetic_scores` is: never scored, never kept."""
        synthetic_scores = [s for s in synthetic_scores if s is not None]
        has_web = web_score is not None
        scores = [web_score] * has_web + list(synthetic_scores)
        if not scores:
            return
        kept_up_to = effective_thresholds(scores, self.policy, self.keep_top)
        self.images += 1
        self.web += has_web
        self.synthetic += len(synthetic_scores)
        self.images_kept.add([max(scores)])  # the best-ranked caption is kept whenever it passes
        self.web_kept.add([e for e in kept_up_to[:has_web] if e is not None])
        self.synthetic_kept.add([e for e in kept_up_to[has_web:] if e is not None])
        if noisy is not None and has_web:
            self.noisy += noisy
            self.clean += not noisy
            web_kept = [e for e in kept_up_to[:1] if e is not None]
            (self.noisy_web_kept if noisy else self.clean_web_kept).add(web_kept)
            (self.noisy_scores if noisy else self.clean_scores).add([web_score])

    def table(self) -> dict[str, np.ndarray]:
        """Counts and rates per threshold. Removal = the web caption not kept, as in
        `capfilt.bootstrap.truth.NoiseReport`."""
        out = {"threshold": self.thresholds, "images_kept": self.images_kept.counts(),
               "web_kept": self.web_kept.counts(), "synthetic_kept": self.synthetic_kept.counts()}
        if self.noisy + self.clean:
            noisy_removed = self.noisy - self.noisy_web_kept.counts()
            removed = noisy_removed + (self.clean - self.clean_web_kept.counts())
            with np.errstate(invalid="ignore", divide="ignore"):
                out["precision"] = np.where(removed > 0, noisy_removed / np.maximum(removed, 1), np.nan)
                out["recall"] = noisy_removed / self.noisy if self.noisy else np.full(len(removed), np.nan)
        return out

    def roc(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Flagging a web caption as noise when its score is below t: (false positive rate, true positive rate,
        area under the curve), over a fine grid of t."""
        if not (self.noisy and self.clean):
            return None
        tpr = 1 - self.noisy_scores.counts() / self.noisy
        fpr = 1 - self.clean_scores.counts() / self.clean
        fpr, tpr = np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])
        return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


class Reservoir:
    """A seeded uniform sample of at most n items from a stream (algorithm R): same seed, same draw."""

    def __init__(self, n: int, seed: str):
        self.n, self.seen, self.items, self.rng = n, 0, [], random.Random(seed)

    def offer(self, make) -> None:
        """`make()` builds the item only when it is taken: most rows of a large corpus never are."""
        self.seen += 1
        if len(self.items) < self.n:
            self.items.append(make())
        elif self.n:
            j = self.rng.randrange(self.seen)
            if j < self.n:
                self.items[j] = make()


def ground_truth(meta: dict[str, Any]) -> bool | None:
    for outer, inner in GROUND_TRUTH_FIELDS:
        value = (meta.get(outer) or {}).get(inner) if isinstance(meta.get(outer), dict) else None
        if isinstance(value, bool):
            return value
    return None


def _shard_truth(url: str) -> dict[str, bool]:
    from capfilt.data.reader import read_shard

    truth = {}
    for sample in read_shard(url):
        if sample.error is None and (flag := ground_truth(sample.meta)) is not None:
            truth[sample.key] = flag
    return truth


@dataclass
class Scan:
    """What one pass over an output counted: the run's settings, the sweep, the gallery reservoirs, per-shard
    rows, totals and score histograms."""

    settings: dict[str, Any]
    sweep: Sweep
    buckets: dict[str, Reservoir]
    shards: list[dict[str, Any]] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    hist: dict[str, np.ndarray] = field(default_factory=dict)
    truth_note: str = ""
    # Captions each caption rule dropped before scoring, by source (web, synthetic).
    rules: dict[str, Counter] = field(default_factory=lambda: {"web": Counter(), "synthetic": Counter()})
    kind: ScoreKind = PROBABILITY
    seen: list[float] = field(default_factory=lambda: [np.inf, -np.inf])  # lowest and highest score: the plots' range


def histogram_edges(kind: ScoreKind) -> np.ndarray:
    """Fixed bins over the whole range a score can take: 40 over a probability's [0, 1], as fine over [-1, 1]."""
    lowest = LOWEST[kind]
    return np.linspace(lowest, 1, round(HIST_BINS * (1 - lowest)) + 1)


def scan(out: Path, samples: int, seed: int) -> Scan:
    """One streaming pass over the stats and parquet files of `out`."""
    if not out.is_dir():
        raise CapfiltError(f"{out} is not a directory")
    shards = recorded_shards(out)  # the manifest's: other *_stats.json files there are not this run's
    if shards is None:
        raise CapfiltError(f"{out} holds no capfilt output (no {MANIFEST})")
    settings = json.loads((out / MANIFEST).read_text()).get("settings", {})
    selection = settings.get("selection") or {}
    policy, threshold = selection.get("policy", "blip"), float(selection.get("threshold", 0.5))
    kind = score_kind(settings)
    result = Scan(settings, Sweep(threshold_grid(threshold), policy, int(selection.get("keep_top", 2)), LOWEST[kind]),
                  {b: Reservoir(samples, f"{seed}/{b}") for b in (OK, DROPPED, ERROR)}, kind=kind)
    edges = histogram_edges(kind)
    hist = {name: np.zeros(len(edges) - 1, dtype=np.int64) for name in ("web_kept", "web_removed", "synthetic_kept",
                                                                   "synthetic_removed")}
    totals = {"read": 0, "written": 0, "dropped": 0, "web_kept": 0, "synthetic_kept": 0, "synthetic_generated": 0,
              "captions_truncated": 0,
              "errors": Counter()}
    done = set()
    truth_found, misses = False, 0
    for stats_file in (stats_path(out, shard) for shard in sorted(shards)):
        if not stats_file.exists():
            continue
        stats = json.loads(stats_file.read_text())
        name = stats["shard"]
        done.add(name)
        for k in ("read", "written", "dropped", "web_kept", "synthetic_kept", "synthetic_generated",
                  "captions_truncated"):
            totals[k] += stats.get(k, 0)
        totals["errors"].update(stats["errors"])
        result.shards.append({**{k: stats.get(k) for k in ("shard", "read", "written", "dropped", "duration_s",
                                                           "input")},
                              "errors": sum(stats["errors"].values())})
        truth: dict[str, bool] = {}
        # Ground truth belongs to a corpus: once TRUTH_PROBE shards in a row had none, the rest are not read
        # (reading the inputs again costs as much as the run's own reading did).
        if stats.get("input") and (truth_found or misses < TRUTH_PROBE):
            try:
                truth = _shard_truth(stats["input"])
            except Exception as exc:  # moved or unreachable input: the report goes on without ground truth
                result.truth_note = f"input shard {stats['input']} could not be read ({type(exc).__name__})"
            truth_found, misses = truth_found or bool(truth), 0 if truth else misses + 1
        parquet = pq.ParquetFile(out / f"{name}.parquet")
        columns = COLUMNS + [c for c in RULE_COLUMNS if c in parquet.schema_arrow.names]  # a format-2 shard: none
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                _add_row(result, hist, edges, name, row, truth.get(row["key"]))
    result.unfinished = unfinished_shards(out, shards, done)
    result.totals, result.hist = totals, hist
    result.totals["shards"] = len(done)
    return result


def _add_row(result: Scan, hist, edges, shard: str, row: dict[str, Any], noisy: bool | None) -> None:
    status = row["status"]
    item = lambda: {"shard": shard, "noisy": noisy, **{k: row.get(k) for k in COLUMNS + RULE_COLUMNS}}  # noqa: E731
    if status in result.buckets:
        result.buckets[status].offer(item)
    if status != ERROR:  # rules apply in caption-only runs too, which score nothing
        result.rules["web"].update([row["web_rule"]] if row.get("web_rule") else [])
        result.rules["synthetic"].update(r for r in row.get("synthetic_rules") or [] if r)
    if status == ERROR or row["synthetic_scores"] is None:  # an error, or nothing scored (`capfilt caption`)
        return
    synthetic = [s for s in row["synthetic_scores"] if s is not None]
    result.sweep.add(row["web_score"], synthetic, noisy)
    kept = set(row["kept_captions"] or [])
    if row["web_score"] is not None:
        hist["web_kept" if row["web_caption"] in kept else "web_removed"][_bin(edges, row["web_score"])] += 1
    for caption, score in zip(row["synthetic_captions"] or [], row["synthetic_scores"] or []):
        if score is not None:
            hist["synthetic_kept" if caption in kept else "synthetic_removed"][_bin(edges, score)] += 1
    for score in [row["web_score"], *synthetic]:
        if score is not None:
            result.seen[:] = [min(result.seen[0], score), max(result.seen[1], score)]


def _bin(edges: np.ndarray, score: float) -> int:
    return min(max(int(np.searchsorted(edges, score, side="right")) - 1, 0), len(edges) - 2)
