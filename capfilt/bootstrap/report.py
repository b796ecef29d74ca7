"""`capfilt report`: one self-contained HTML page on an output directory, for looking at what the filter did.

Totals, score histograms, the keep rate against the threshold under the run's policy (from the recorded scores),
precision/recall and ROC when the input json carries ground truth, a per-shard table, and a seeded gallery of
kept, dropped and failed samples with inline thumbnails. The counting is `capfilt/bootstrap/tally.py` (a
streaming scan into fixed-size counters); this file draws and renders what it counted, and the page's size does
not grow with the corpus either (gallery and shard table are capped).
"""

from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from capfilt.bootstrap.tally import GROUND_TRUTH_FIELDS, LOWEST, Scan, Sweep, histogram_edges, scan
from capfilt.data.files import publish
from capfilt.data.schema import COSINE, DROPPED, ERROR, OK, PROBABILITY, SCORE_LABELS, ScoreKind
from capfilt.settings import ReportConfig

log = logging.getLogger(__name__)

MAX_SHARD_ROWS = 200  # shard table rows, at most
THUMB_PX = 160
TEXT_CHARS = 300  # captions and details are cut there on the page
SWEEP_TABLE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# A CLIP cosine's: around where a good match scores on OpenAI ViT-B/32 (about 0.3) and LAION-5B's 0.28.
COSINE_SWEEP_TABLE = (0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35, 0.4)


# ------------------------------------------------------------------------------------------------ images


def thumbnail(data: bytes) -> str:
    """A small JPEG data URI of an image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def attach_images(out: Path, scan_result: Scan) -> None:
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
    rules = item.get("synthetic_rules") or [None] * len(synthetic)
    web = [(item["web_caption"], item["web_score"], "web", item.get("web_rule"))] \
        if item["web_caption"] is not None else []
    pairs = web + [(c, s, "synthetic", r) for c, s, r in zip(synthetic, scores, rules)]
    return [{"caption": _cut(c), "score": s, "source": src, "kept": c in kept, "rule": r}
            for c, s, src, r in pairs]


def _rate(n: int, d: int) -> str:
    return f"{n:,} / {d:,} ({n / d:.1%})" if d else "–"


def build_page(out: Path, result: Scan) -> dict[str, Any]:
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
        rows.append({"threshold": t, "run": t == threshold, "fraction": (settings.get("fraction") or {}).get(
                     "fraction") if t == threshold else None,
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
        "fraction": settings.get("fraction"),  # `select --fraction`: how its threshold was worked out
        "rules": sorted((code, result.rules["web"][code], result.rules["synthetic"][code])
                        for code in set(result.rules["web"]) | set(result.rules["synthetic"])),
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
