"""`capfilt report`: one self-contained HTML page on an output directory, for looking at what the filter did.

Totals, score histograms, the keep rate against the threshold under the run's policy (from the recorded scores),
precision/recall and ROC when the input json carries ground truth, a per-shard table, and a seeded gallery of
kept, dropped and failed samples with inline thumbnails. The parquet is streamed batch by batch and every
accumulator is fixed-size (histogram bins, threshold grid, gallery reservoirs), so memory does not grow with
the corpus; the page's size does not either (gallery and shard table are capped).

About 490 lines in one file on purpose: each counter, its plot and its place on the page change together.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from capfilt.data.files import publish
from capfilt.data.schema import (
    COSINE,
    DROPPED,
    ERROR,
    MANIFEST,
    OK,
    PROBABILITY,
    SCORE_LABELS,
    ScoreKind,
    score_kind,
    shard_files,
    stats_path,
)
from capfilt.data.writer import recorded_shards
from capfilt.errors import CapfiltError
from capfilt.settings import ReportConfig

log = logging.getLogger(__name__)

# Where inputs carry planted noise: the demo corpus (`shards/build_demo.py`) and `capfilt synth`.
GROUND_TRUTH_FIELDS = (("capfilt_demo", "noisy"), ("synth", "noisy"))
GRID_STEP = 0.01  # threshold sweep resolution; the run's own threshold is added to the grid exactly
ROC_POINTS = 1001
TRUTH_PROBE = 3  # shards read for ground truth before concluding the corpus has none
HIST_BINS = 40
MAX_SHARD_ROWS = 200  # shard table rows, at most
THUMB_PX = 160
TEXT_CHARS = 300  # captions and details are cut there on the page
SWEEP_TABLE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# A CLIP cosine: where its scores lie (a good match scores about 0.3 on ViT-B/32), and the lowest value they can
# take. Thresholds stay in [0, 1] (a negative one keeps nearly everything).
COSINE_SWEEP_TABLE = (0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35, 0.4)
LOWEST = {PROBABILITY: 0.0, COSINE: -1.0}
BATCH_ROWS = 4096
COLUMNS = ["key", "status", "reason", "detail", "web_caption", "web_score", "synthetic_captions",
           "synthetic_scores", "kept_captions"]


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
    lowest: float = 0.0  # the lowest score the filter gives (a probability's 0, a cosine's -1): the ROC's range
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
        """One scored sample; `web_score` None: an image-only sample (synthetic captions alone)."""
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
class _Scan:
    settings: dict[str, Any]
    sweep: Sweep
    buckets: dict[str, Reservoir]
    shards: list[dict[str, Any]] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    hist: dict[str, np.ndarray] = field(default_factory=dict)
    truth_note: str = ""
    kind: ScoreKind = PROBABILITY
    seen: list[float] = field(default_factory=lambda: [np.inf, -np.inf])  # lowest and highest score: the plots' range


def histogram_edges(kind: ScoreKind) -> np.ndarray:
    """Fixed bins over the whole range a score can take: 40 over a probability's [0, 1], as fine over [-1, 1]."""
    lowest = LOWEST[kind]
    return np.linspace(lowest, 1, round(HIST_BINS * (1 - lowest)) + 1)


def scan(out: Path, samples: int, seed: int) -> _Scan:
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
    result = _Scan(settings, Sweep(threshold_grid(threshold), policy, int(selection.get("keep_top", 2)), LOWEST[kind]),
                   {b: Reservoir(samples, f"{seed}/{b}") for b in (OK, DROPPED, ERROR)}, kind=kind)
    edges = histogram_edges(kind)
    hist = {name: np.zeros(len(edges) - 1, dtype=np.int64) for name in ("web_kept", "web_removed",
                                                                         "synthetic_kept", "synthetic_removed")}
    totals = {"read": 0, "written": 0, "dropped": 0, "web_kept": 0, "synthetic_kept": 0, "synthetic_generated": 0,
              "captions_truncated": 0, "errors": Counter()}
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
        for batch in pq.ParquetFile(out / f"{name}.parquet").iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
            for row in batch.to_pylist():
                _add_row(result, hist, edges, name, row, truth.get(row["key"]))
    result.unfinished = sorted(s for s in shards if s not in done
                               and any((out / name).exists() for name in shard_files(s)))
    result.totals, result.hist = totals, hist
    result.totals["shards"] = len(done)
    return result


def _add_row(result: _Scan, hist, edges, shard: str, row: dict[str, Any], noisy: bool | None) -> None:
    status = row["status"]
    item = lambda: {"shard": shard, "noisy": noisy, **{k: row[k] for k in COLUMNS}}  # noqa: E731
    if status in result.buckets:
        result.buckets[status].offer(item)
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


# ------------------------------------------------------------------------------------------------ images


def thumbnail(data: bytes) -> str:
    """A small JPEG data URI of an image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def attach_images(out: Path, scan_result: _Scan) -> None:
    """Thumbnails for the gallery: kept samples from the output tars, dropped ones from the input shards the
    run recorded (they are not in the output). Each needed shard is read once."""
    from capfilt.data.reader import read_shard

    inputs = {s["shard"]: s.get("input") for s in scan_result.shards}
    wanted: dict[str, dict[str, list[dict]]] = {}
    for status in (OK, DROPPED):
        for item in scan_result.buckets[status].items:
            source = str(out / f"{item['shard']}.tar") if status == OK else inputs.get(item["shard"])
            if not source:
                item["image_note"] = "the run recorded no input shard (written before capfilt recorded inputs)"
                continue
            wanted.setdefault(source, {}).setdefault(item["key"], []).append(item)
    for source, by_key in wanted.items():
        try:
            for sample in read_shard(source):
                for item in by_key.get(sample.key, []):
                    if sample.image is None:
                        item["image_note"] = f"no image in {source} ({sample.error})"
                        continue
                    try:
                        item["thumb"] = thumbnail(sample.image)
                    except Exception as exc:  # PIL raises many types for bad bytes
                        item["image_note"] = f"image does not decode: {type(exc).__name__}"
        except Exception as exc:  # moved or unreachable shard: say so beside each sample
            for items in by_key.values():
                for item in items:
                    item.setdefault("image_note", f"{source} could not be read: {type(exc).__name__}: {exc}")
        for items in by_key.values():
            for item in items:
                item.setdefault("image_note", f"key not found in {source}")


# ------------------------------------------------------------------------------------------------ plots


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(ncols: int = 1, width: float = 6.4):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg rendering

    fig = Figure(figsize=(width, 3.4), dpi=100, layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def score_range(kind: ScoreKind, seen: list[float]) -> tuple[float, float]:
    """The plots' score axis: a probability's [0, 1]; for a cosine, the 0.05 steps around the scores seen (CLIP
    cosines crowd into a small part of [-1, 1])."""
    if kind == PROBABILITY or not np.isfinite(seen[0]):
        return LOWEST[kind], 1.0
    return max(LOWEST[kind], np.floor(seen[0] * 20) / 20 - 0.05), min(1.0, np.ceil(seen[1] * 20) / 20 + 0.05)


def plot_histograms(hist: dict[str, np.ndarray], threshold: float, kind: ScoreKind = PROBABILITY,
                    xlim: tuple[float, float] = (0.0, 1.0)) -> str:
    fig, axes = _figure(2, 9.6)
    edges = histogram_edges(kind)
    width = edges[1] - edges[0]
    for ax, source in zip(axes, ("web", "synthetic")):
        kept, removed = hist[f"{source}_kept"], hist[f"{source}_removed"]
        ax.bar(edges[:-1], removed, width=width, align="edge", color="#d62728", label="removed")
        ax.bar(edges[:-1], kept, width=width, align="edge", bottom=removed, color="#2ca02c", label="kept")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set(title=f"{source} captions ({int(kept.sum() + removed.sum()):,})",
               xlabel=f"filter score: {SCORE_LABELS[kind]}", ylabel="captions", xlim=xlim)
        ax.legend(fontsize=8)
    return _png(fig)


def plot_sweep(table: dict[str, np.ndarray], sweep: Sweep, threshold: float, kind: ScoreKind = PROBABILITY,
               xlim: tuple[float, float] = (0.0, 1.0)) -> str:
    fig, (ax,) = _figure()
    t = table["threshold"]
    for key, total, label in (("images_kept", sweep.images, "images kept"),
                              ("web_kept", sweep.web, "web captions kept"),
                              ("synthetic_kept", sweep.synthetic, "synthetic captions kept")):
        if total:
            ax.plot(t, table[key] / total, label=label)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"run's threshold {threshold:g}")
    policy = sweep.policy + (f", keep top {sweep.keep_top}" if sweep.policy == "blip2" else "")
    ax.set(title=f"keep rate against the threshold (policy {policy})", xlabel=f"threshold ({SCORE_LABELS[kind]})",
           ylabel="share kept", xlim=(max(0.0, xlim[0]), xlim[1]), ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _png(fig)


def plot_precision_recall(table: dict[str, np.ndarray], threshold: float, kind: ScoreKind = PROBABILITY,
                          xlim: tuple[float, float] = (0.0, 1.0)) -> str:
    fig, (ax,) = _figure()
    ax.plot(table["threshold"], table["precision"], label="precision of the removals")
    ax.plot(table["threshold"], table["recall"], label="recall of planted noise")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"run's threshold {threshold:g}")
    ax.set(title="web captions removed vs planted noise", xlabel=f"threshold ({SCORE_LABELS[kind]})",
           xlim=(max(0.0, xlim[0]), xlim[1]), ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _png(fig)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> str:
    fig, (ax,) = _figure(width=4.2)
    ax.plot(fpr, tpr, label=f"web score (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(title="ROC: noise flagged below a score", xlabel="false positive rate (clean flagged)",
           ylabel="true positive rate (noise flagged)", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


# ------------------------------------------------------------------------------------------------ page


def _cut(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"


def _candidates(item: dict[str, Any]) -> list[dict[str, Any]]:
    kept = item["kept_captions"] or []
    synthetic = item["synthetic_captions"] or []
    scores = item["synthetic_scores"] or [None] * len(synthetic)
    web = [(item["web_caption"], item["web_score"], "web")] if item["web_caption"] is not None else []
    pairs = web + [(c, s, "synthetic") for c, s in zip(synthetic, scores)]
    return [{"caption": _cut(c), "score": s, "source": src, "kept": c in kept} for c, s, src in pairs]


def _rate(n: int, d: int) -> str:
    return f"{n:,} / {d:,} ({n / d:.1%})" if d else "–"


def build_page(out: Path, result: _Scan) -> dict[str, Any]:
    """Everything the template shows, as plain values."""
    settings, sweep, totals = result.settings, result.sweep, result.totals
    selection = settings.get("selection") or {}
    threshold = float(selection.get("threshold", 0.5))
    kind, xlim = result.kind, score_range(result.kind, result.seen)
    table = sweep.table()
    ground = "precision" in table
    rows = []
    for t in sorted(set(COSINE_SWEEP_TABLE if kind == COSINE else SWEEP_TABLE) | {threshold}):
        j = int(np.searchsorted(table["threshold"], t))  # every one of these is on the grid
        rows.append({"threshold": t, "run": t == threshold,
                     "images": _rate(int(table["images_kept"][j]), sweep.images),
                     "web": _rate(int(table["web_kept"][j]), sweep.web),
                     "synthetic": _rate(int(table["synthetic_kept"][j]), sweep.synthetic),
                     "precision": table["precision"][j] if ground else None,
                     "recall": table["recall"][j] if ground else None})
    plots = []
    if sweep.images:
        plots.append({"id": "histograms", "title": f"Score histograms ({SCORE_LABELS[kind]})",
                      "src": plot_histograms(result.hist, threshold, kind, xlim)})
        plots.append({"id": "sweep", "title": "Threshold sweep",
                      "src": plot_sweep(table, sweep, threshold, kind, xlim)})
    if ground:
        plots.append({"id": "precision-recall", "title": "Precision and recall against the planted noise",
                      "src": plot_precision_recall(table, threshold, kind, xlim)})
    roc = sweep.roc()
    if roc is not None:
        plots.append({"id": "roc", "title": "ROC", "src": plot_roc(*roc)})
    shards = result.shards
    shard_note = ""
    if len(shards) > MAX_SHARD_ROWS:
        shards = sorted(shards, key=lambda s: s["written"] / max(1, s["read"]))[:MAX_SHARD_ROWS]
        shard_note = (f"{MAX_SHARD_ROWS} of {len(result.shards):,} shards shown: those with the lowest keep rate "
                      "(`capfilt stats` counts them all).")
    for s in shards:
        s["keep"] = _rate(s["written"], s["read"])
    gallery = []
    for status, title in ((OK, "Kept"), (DROPPED, "Dropped"), (ERROR, "Errors")):
        bucket = result.buckets[status]
        items = sorted(bucket.items, key=lambda i: (i["shard"], i["key"] or ""))
        for item in items:
            item["candidates"] = _candidates(item) if status != ERROR else []
            item["best"] = _cut((item["kept_captions"] or [""])[0])
            item["detail"] = _cut(item["detail"])
        gallery.append({"status": status, "title": title, "items": items, "total": bucket.seen})
    return {
        "out": str(out.resolve()), "settings": settings, "policy": selection.get("policy"),
        "threshold": selection.get("threshold"), "keep_top": selection.get("keep_top"),  # none: nothing filtered
        "captioner": (settings.get("captioner") or {}).get("model"),
        "filter": (settings.get("filter") or {}).get("model"), "selected_from": settings.get("selected_from"),
        "calibrated": ((settings.get("filter") or {}).get("calibration") or {}).get("score"),
        "score_label": SCORE_LABELS[kind], "cosine": kind == COSINE,
        "totals": totals, "errors": sorted(totals["errors"].items()), "error_total": sum(totals["errors"].values()),
        "rates": {"images": _rate(totals["written"], totals["read"]),
                  "web": _rate(totals["web_kept"], sweep.web),
                  "synthetic": _rate(totals["synthetic_kept"], sweep.synthetic)},
        "unfinished": result.unfinished, "plots": plots, "sweep_rows": rows, "ground_truth": ground,
        "truth_fields": [".".join(f) for f in GROUND_TRUTH_FIELDS], "truth_note": result.truth_note,
        "noisy": sweep.noisy, "clean": sweep.clean, "auc": roc[2] if roc else None,
        "shards": shards, "shard_note": shard_note, "gallery": gallery,
    }


def render(page: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("capfilt.bootstrap", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    # Precision is undefined where nothing is removed: a dash, not "nan".
    env.filters["rate"] = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:.3f}"
    return env.get_template("report.html.j2").render(**page)


def write_report(config: ReportConfig) -> Path:
    """Write the page and return its path."""
    out = Path(config.out)
    result = scan(out, config.samples, config.seed)
    attach_images(out, result)
    html = Path(config.html) if config.html else out / "report.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    text = render(build_page(out, result))
    # Hidden and not ending in .tmp: a half-written page is never taken for a shard left over by a run.
    tmp = html.with_name(f".{html.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    publish(tmp, html)
    log.info("report of %s written to %s (%d bytes)", out, html, len(text))
    return html
