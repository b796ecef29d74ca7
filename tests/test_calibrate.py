"""`capfilt calibrate` and `--calibration`: the fit, the pairs, and the CLI from a human-captioned shard to a
filter run whose scores are the calibrated P(match)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import demo_samples, write_tar
from typer.testing import CliRunner

from capfilt.bootstrap.calibrate import calibration_pairs, fit_logistic
from capfilt.data.reader import decode_image
from capfilt.data.schema import MANIFEST
from capfilt.models.scorer import Calibration, Scorer
from capfilt.settings import ScorerConfig
from cli import app


def test_the_fit_is_the_log_odds_whatever_the_class_counts():
    """Unit Gaussians at +1 (matches) and -1 (mismatches) have log-odds 2x at equal priors; the class-balanced
    fit finds it with 4x as many mismatches too, so 0.5 stays where a match and a mismatch are equally likely."""
    generator = torch.Generator().manual_seed(0)
    matched = (torch.randn(5000, generator=generator) + 1).tolist()
    mismatched = (torch.randn(20000, generator=generator) - 1).tolist()
    slope, bias = fit_logistic(matched + mismatched, [True] * 5000 + [False] * 20000)
    assert slope == pytest.approx(2.0, abs=0.1) and bias == pytest.approx(0.0, abs=0.1)


def test_separable_pairs_give_a_finite_steep_fit():
    slope, bias = fit_logistic([0.4, 0.5, 0.6, 0.1, 0.2, 0.0], [True] * 3 + [False] * 3)
    calibration = Calibration(score="itc", slope=slope, bias=bias, filter="m", specs=[], auc={}, pairs={},
                              at_half={})
    assert calibration(0.3) == pytest.approx(0.5, abs=1e-6)  # half-way between the classes
    assert calibration(0.45) > 0.95 and calibration(0.15) < 0.05 and calibration(-1e6) == 0.0


def test_mismatched_pairs_are_other_images_captions_never_the_images_own():
    captions = [["a dog", "a brown dog"], ["a cat"], ["a dog", "a red car"], ["a tree"]]
    pairs = calibration_pairs(captions, negatives=2, seed=0)
    for i, own in enumerate(captions):
        mine = [p for p in pairs if p.image == i]
        assert [p.caption for p in mine if p.match] == own
        assert all(p.caption not in own for p in mine if not p.match)
        assert len([p for p in mine if not p.match]) <= 2
    assert not any(p.caption == "a dog" and not p.match for p in pairs if p.image in (0, 2))
    assert pairs == calibration_pairs(captions, negatives=2, seed=0) != calibration_pairs(captions, 2, seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    human = []
    for sample in demo_samples(6):  # five human captions each, as a capfilt block lists them
        meta = json.loads(sample["json"])
        block = {"candidates": [{"caption": c, "source": "human", "score": None, "kept": True}
                                for c in meta["capfilt_demo"]["human_captions"]], "captioner": None, "filter": None}
        human.append({**sample, "json": json.dumps({"capfilt": block}).encode()})
    return write_tar(root / "human.tar", human), write_tar(root / "corpus.tar", demo_samples(4, start=6)), root


def test_calibrate_then_filter_scores_with_the_calibrated_probability(tiny_models, shards):
    human, corpus, root = shards
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", str(human), "--filter", tiny_models["blip_itm"], "--out",
                                 str(root / "cal.json"), "--negatives", "3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "held-out ROC AUC on 6 images (30 matched, 18 mismatched pairs)" in result.output
    calibration = Calibration.read(str(root / "cal.json"))
    assert calibration.score in ("itm", "itc") and set(calibration.auc) == {"itm", "itc"}
    assert calibration.auc[calibration.score] == max(calibration.auc.values())

    result = runner.invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"], "--calibration",
                                 str(root / "cal.json"), "--out", str(root / "out"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(next((root / "out").glob("*.parquet"))).to_pylist()
    scorer = Scorer(ScorerConfig(model=tiny_models["blip_itm"]))
    samples = demo_samples(4, start=6)
    pixels = scorer.image_transform([decode_image(s["jpg"]) for s in samples])
    raw = scorer.raw(pixels, [[s["txt"].decode()] for s in samples], calibration.score)
    expected = {s["__key__"]: calibration(v[0]) for s, v in zip(samples, raw)}
    assert {r["key"]: r["web_score"] for r in rows} == pytest.approx(expected, abs=1e-6)
    assert {r["key"]: r["web_score"] for r in rows} != pytest.approx(  # not the head's own P(match)
        {s["__key__"]: v[0] for s, v in zip(samples, scorer(pixels, [[s["txt"].decode()] for s in samples]))})
    recorded = json.loads((root / "out" / MANIFEST).read_text())["settings"]["filter"]["calibration"]
    assert recorded["slope"] == calibration.slope and recorded["score"] == calibration.score


def test_a_bad_calibration_file_is_one_line(tiny_models, shards, tmp_path):
    _, corpus, _ = shards
    (tmp_path / "bad.json").write_text('{"score": "itm"}')
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        result = CliRunner().invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"],
                                          "--calibration", str(path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "calibrat" in result.output, \
            result.output
    assert not (tmp_path / "out").exists()


def test_calibration_needs_two_captioned_images(tiny_models, tmp_path):
    shard = write_tar(tmp_path / "one.tar", demo_samples(1))
    result = CliRunner().invoke(app, ["calibrate", str(shard), "--filter", tiny_models["blip_itm"], "--out",
                                      str(tmp_path / "cal.json")])
    assert result.exit_code == 2 and "at least 2 captioned images" in result.output
    assert not (tmp_path / "cal.json").exists()
