"""`capfilt report`: the sweep against direct counts, the page's contents, and the page in a real browser."""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, bad_samples, read_json, strip_none, write_tar
from PIL import Image
from typer.testing import CliRunner

from capfilt.bootstrap import report, tally
from capfilt.bootstrap.pipeline import run
from capfilt.bootstrap.selection import select
from capfilt.cli import app
from capfilt.data.reader import read_shard
from capfilt.data.schema import Candidate
from capfilt.data.synth import write_synth
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Scorer
from capfilt.settings import CaptionerConfig, RunConfig, ScorerConfig, SelectionConfig, SynthConfig

SCREENSHOTS = REPO / "bench" / "out"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models):
    """A synthetic corpus with planted noise plus a shard of bad input (first in order, without ground truth),
    bootstrapped with tiny models at a threshold inside their score range (some samples kept, some dropped)."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "in"
    write_synth(inputs, SynthConfig(n=60, per_shard=20, noise=0.3, size=32))
    write_tar(inputs / "bad-00000.tar", strip_none(bad_samples()))
    out = root / "out"
    captioner = Captioner(CaptionerConfig(model=tiny_models["blip_captioner"], num_captions=2))
    scorer = Scorer(ScorerConfig(model=tiny_models["blip_itm"]))
    threshold = 0.445  # the tiny filter scores between about 0.42 and 0.47
    run(RunConfig(specs=(str(inputs),), out=str(out), batch_size=8, workers=0, progress=False), captioner, scorer,
        SelectionConfig(threshold=threshold))
    return inputs, out, threshold


def parquet_rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def direct_counts(rows, config: SelectionConfig) -> tuple[int, int, int]:
    """Images, web captions and synthetic captions the policy keeps, by running `selection.select` per row."""
    images = web = synthetic = 0
    for row in rows:
        if row["status"] == "error":
            continue
        cands = [Candidate(row["web_caption"], "web", row["web_score"])] * (row["web_caption"] is not None) + [
            Candidate(c, "synthetic", s) for c, s in zip(row["synthetic_captions"], row["synthetic_scores"])]
        kept = select(cands, config)
        images += bool(kept)
        web += sum(bool(c.kept) for c in cands if c.source == "web")
        synthetic += sum(bool(c.kept) for c in cands if c.source == "synthetic")
    return images, web, synthetic


def test_threshold_sweep_matches_a_direct_count_on_the_parquet(corpus):
    _, out, threshold = corpus
    rows = parquet_rows(out)
    result = tally.scan(out, samples=0, seed=0)
    table = result.sweep.table()
    # 60 synth, 4 usable of the bad shard (one image-only)
    assert result.sweep.images == sum(r["status"] != "error" for r in rows) == 64
    for j, t in enumerate(table["threshold"]):
        expected = direct_counts(rows, SelectionConfig(threshold=float(t)))
        assert (table["images_kept"][j], table["web_kept"][j], table["synthetic_kept"][j]) == expected, t
    # At the run's threshold the sweep says what the run did.
    j = int(np.searchsorted(table["threshold"], threshold))
    assert table["threshold"][j] == threshold
    stats = [read_json(p) for p in out.glob("*_stats.json")]
    written = sum(s["written"] for s in stats)
    assert 0 < written < 64
    assert table["images_kept"][j] == written
    assert table["web_kept"][j] == sum(s["web_kept"] for s in stats)
    assert table["synthetic_kept"][j] == sum(s["synthetic_kept"] for s in stats)

    # BLIP-2's top-k policy over the same scores: a sweep fed the rows counts what select keeps.
    sweep = tally.Sweep(tally.threshold_grid(threshold), "blip2", keep_top=1)
    for row in rows:
        if row["status"] != "error":
            sweep.add(row["web_score"], row["synthetic_scores"])
    table = sweep.table()
    for j, t in enumerate(table["threshold"]):
        expected = direct_counts(rows, SelectionConfig(policy="blip2", threshold=float(t), keep_top=1))
        assert (table["images_kept"][j], table["web_kept"][j], table["synthetic_kept"][j]) == expected, t


def test_sweep_breaks_ties_and_equal_scores_as_select_does():
    rng = random.Random(0)
    grid = tally.threshold_grid(0.5)
    for policy, keep_top in (("blip", 2), ("blip2", 1), ("blip2", 2)):
        sweep, rows = tally.Sweep(grid, policy, keep_top), []
        for _ in range(300):  # scores on the grid itself, with many ties: the edge cases of >= and ranking
            web, synthetic = rng.choice(grid[::10]), [rng.choice(grid[::10]) for _ in range(rng.randrange(4))]
            sweep.add(float(web), [float(s) for s in synthetic])
            rows.append({"status": "ok", "web_caption": "w", "web_score": float(web),
                         "synthetic_captions": [f"s{i}" for i in range(len(synthetic))],
                         "synthetic_scores": [float(s) for s in synthetic]})
        table = sweep.table()
        for j, t in enumerate(grid):
            expected = direct_counts(rows, SelectionConfig(policy=policy, threshold=float(t), keep_top=keep_top))
            assert (table["images_kept"][j], table["web_kept"][j], table["synthetic_kept"][j]) == expected


def test_precision_recall_and_roc_against_a_direct_count_of_the_ground_truth(corpus):
    inputs, out, threshold = corpus
    result = tally.scan(out, samples=0, seed=0)
    table = result.sweep.table()
    truth = {s.key: tally.ground_truth(s.meta) for p in sorted(inputs.glob("*.tar")) for s in read_shard(str(p))
             if s.error is None and tally.ground_truth(s.meta) is not None}
    rows = [r for r in parquet_rows(out) if r["key"] in truth and r["status"] != "error"]
    # 60 synth samples (18 planted) and the two demo photos of the bad shard (capfilt_demo.noisy, clean);
    # its third good sample has no ground truth and is left out, not counted clean.
    assert (result.sweep.noisy, result.sweep.clean) == (18, 44) == (
        sum(truth[r["key"]] for r in rows), sum(not truth[r["key"]] for r in rows))
    for j, t in enumerate(table["threshold"]):
        removed = [r for r in rows if not (r["web_score"] >= t)]  # blip: the web caption goes below t
        noisy_removed = sum(truth[r["key"]] for r in removed)
        assert table["recall"][j] == pytest.approx(noisy_removed / 18)
        if removed:
            assert table["precision"][j] == pytest.approx(noisy_removed / len(removed))
        else:
            assert np.isnan(table["precision"][j])
    j = int(np.searchsorted(table["threshold"], threshold))
    kept_web = [r for r in rows if r["web_caption"] in (r["kept_captions"] or [])]  # what the run did
    assert table["recall"][j] == pytest.approx((18 - sum(truth[r["key"]] for r in kept_web)) / 18)
    fpr, tpr, auc = result.sweep.roc()
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    # AUC = P(a clean web caption scores above a noisy one), ties half, counted pair by pair.
    clean = [r["web_score"] for r in rows if not truth[r["key"]]]
    noisy = [r["web_score"] for r in rows if truth[r["key"]]]
    pairs = np.mean([(c > n) + 0.5 * (c == n) for c in clean for n in noisy])
    assert auc == pytest.approx(pairs, abs=0.02)  # the ROC grid is 0.001 wide


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.gallery, self.rows = [], [], None, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "data-status" in attrs:
            self.gallery = attrs["data-status"]
        if tag == "img":
            self.images.append((attrs.get("class"), self.gallery, attrs["src"]))
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])


def decode(data_uri: str) -> Image.Image:
    head, data = data_uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_report_page_is_self_contained_and_shows_every_part(corpus, tmp_path):
    inputs, out, _ = corpus
    html = report.write_report(report.ReportConfig(out=str(out), html=str(tmp_path / "r.html"), samples=5, seed=1))
    text = html.read_text()
    page = _Page()
    page.feed(text)
    assert all(link.startswith("data:") for link in page.links)  # nothing fetched: opens from disk offline
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    plots = [decode(src) for cls, _, src in page.images if cls == "plot"]
    assert len(plots) == 4 and all(p.size[0] > 200 and p.size[1] > 150 for p in plots)  # histograms, sweep, PR, ROC
    thumbs = {status: [decode(src) for cls, g, src in page.images if cls == "thumb" and g == status]
              for status in ("ok", "dropped")}
    rows = parquet_rows(out)
    assert len(thumbs["ok"]) == min(5, sum(r["status"] == "ok" for r in rows)) == 5
    assert len(thumbs["dropped"]) == min(5, sum(r["status"] == "dropped" for r in rows)) == 5
    assert all(max(t.size) <= report.THUMB_PX for ts in thumbs.values() for t in ts)
    errors = sum(r["status"] == "error" for r in rows)
    assert f"Errors: {min(5, errors)} of {errors}" in text and "corrupt_image" in text and "caption_not_utf8" in text
    assert "planted noise" in text and "Precision and recall" in text
    assert "synth-00000" in text and "bad-00000" in text  # shard table

    # Dropped images are the input shards' images, since the output tars do not hold them.
    result = tally.scan(out, samples=5, seed=1)
    report.attach_images(out, result)
    inputs_by_key = {s.key: s.image for p in sorted(inputs.glob("*.tar")) for s in read_shard(str(p))}
    for item in result.buckets["dropped"].items:
        assert item["thumb"] == report.thumbnail(inputs_by_key[item["key"]])


def test_gallery_draw_is_seeded(corpus):
    _, out, _ = corpus
    def keys(seed):
        result = tally.scan(out, samples=4, seed=seed)
        return {b: [(i["shard"], i["key"]) for i in r.items] for b, r in result.buckets.items()}
    assert keys(3) == keys(3)
    assert keys(3) != keys(4)


def test_report_survives_moved_inputs_and_caps_the_shard_table(corpus, tmp_path, monkeypatch):
    inputs, out, _ = corpus
    moved = tmp_path / "out"
    shutil.copytree(out, moved)
    for stats_file in moved.glob("*_stats.json"):  # inputs recorded at a place that no longer exists
        stats = read_json(stats_file)
        stats["input"] = str(tmp_path / "gone" / Path(stats["input"]).name)
        stats_file.write_text(json.dumps(stats))
    monkeypatch.setattr(report, "MAX_SHARD_ROWS", 2)
    text = report.write_report(report.ReportConfig(out=str(moved), samples=3)).read_text()
    assert "could not be read" in text  # beside each dropped sample, and for the ground truth
    assert "No ground truth" in text
    assert "2 of 4 shards shown" in text
    assert text.count('class="thumb"') == 3  # kept samples still come from the output tars


def test_report_command(corpus, tmp_path):
    _, out, _ = corpus
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(out), "--html", str(tmp_path / "x.html"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'x.html'}" in result.output and (tmp_path / "x.html").stat().st_size > 10_000
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "no capfilt output" in bad.output
    help_text = runner.invoke(app, ["report", "--help"]).output
    for words in ("--html", "--samples", "--seed", "ground truth", "self-contained"):
        assert words in help_text


# ------------------------------------------------------------------------------------------------ browser


def _browser():
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                    None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium + chromedriver on this machine (`apt-get install chromium chromium-driver`; "
                    ".ci/run installs them)")
    return chromium, driver


def test_report_renders_in_a_real_browser(corpus, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser()
    _, out, _ = corpus
    html = report.write_report(report.ReportConfig(out=str(out), html=str(tmp_path / "report.html"), samples=6))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        browser.get(html.as_uri())
        # Every image decoded by the browser itself, with its rendered size.
        images = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const imgs = [...document.images];
            Promise.all(imgs.map(i => i.decode().then(() => true, () => false))).then(ok => done(imgs.map((i, n) => ({
                cls: i.className, gallery: i.closest('[data-status]')?.dataset.status ?? null, decoded: ok[n],
                natural: [i.naturalWidth, i.naturalHeight], shown: [i.clientWidth, i.clientHeight]}))));""")
        plots = [i for i in images if i["cls"] == "plot"]
        assert len(plots) == 4
        assert all(i["decoded"] and min(i["natural"]) > 0 and min(i["shown"]) > 0 for i in plots), plots
        rows = parquet_rows(out)
        for status in ("ok", "dropped"):
            thumbs = [i for i in images if i["cls"] == "thumb" and i["gallery"] == status]
            assert len(thumbs) == min(6, sum(r["status"] == status for r in rows)), status
            assert all(i["decoded"] and min(i["natural"]) > 0 and min(i["shown"]) > 0 for i in thumbs), thumbs
        # No sample card's text spills over its box (a layout fault seen once on the way here).
        spill = browser.execute_script(
            "return [...document.querySelectorAll('.sample')].filter(e => e.scrollHeight > e.clientHeight + 1).length")
        assert spill == 0
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(height, 12000))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOTS / "report.png"))
        assert Image.open(SCREENSHOTS / "report.png").size[0] >= 1000
    finally:
        browser.quit()
