"""`capfilt calibrate` and `--calibration`: the fit, the pairs, and the CLI from a human-captioned shard to a
filter run whose scores are the calibrated P(match)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from helpers import demo_samples, png_bytes, write_tar
from typer.testing import CliRunner

from capfilt.bootstrap.calibrate import calibrate, calibration_pairs, fit_logistic
from capfilt.cli import app
from capfilt.data.reader import decode_image
from capfilt.data.schema import MANIFEST
from capfilt.errors import CapfiltError
from capfilt.models.scorer import Calibration, Scorer, sigmoid
from capfilt.settings import CalibrateConfig, ScorerConfig


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
    calibration = Calibration(score="itc", slope=slope, bias=bias, filter="m", specs=[], clean_text=False, auc={},
                              pairs={}, at_half={})
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


class MarkedScorer:
    """A stand-in filter that knows the truth: image i is i + 8 pixels wide and its caption is "photo i". Its
    itc sees it (own caption 1, any other 0); its itm is inverted."""

    config = SimpleNamespace(model="marked")
    raw_scores = ("itm", "itc")

    @staticmethod
    def preprocess(image):
        return {"pixel_values": torch.tensor([image.width - 8])}

    @staticmethod
    def raw(inputs, texts, kind):
        own = [[float(t == f"photo {int(one['pixel_values'])}") for t in group] for one, group in zip(inputs, texts)]
        return [[v if kind == "itc" else 1 - v for v in group] for group in own]


@pytest.fixture()
def marked(tmp_path):
    samples = [{"__key__": f"{i:03d}", "png": png_bytes((i + 8, 8)), "txt": f"photo {i}".encode()} for i in range(12)]
    return write_tar(tmp_path / "marked.tar", samples)


def test_scores_stay_with_their_pairs_and_the_better_score_is_fitted(marked, tmp_path):
    calibration = calibrate(CalibrateConfig(specs=(str(marked),), out=str(tmp_path / "c.json"), negatives=3,
                                            batch_size=5), MarkedScorer())
    assert calibration.score == "itc" and calibration.auc == {"itm": 0.0, "itc": 1.0}
    assert calibration.pairs == {"images": 12, "matched": 12, "mismatched": 36}
    assert calibration.at_half == {"matched_kept": 1.0, "mismatched_removed": 1.0}
    assert Calibration.read(str(tmp_path / "c.json")) == calibration


def test_a_score_that_cannot_tell_the_pairs_apart_is_refused(marked, tmp_path):
    with pytest.raises(CapfiltError, match="does not tell matched from mismatched pairs"):
        calibrate(CalibrateConfig(specs=(str(marked),), out=str(tmp_path / "c.json"), score="itm"), MarkedScorer())
    assert not (tmp_path / "c.json").exists()


def test_the_margin_is_the_heads_own_probability_before_the_sigmoid(tiny_models):
    scorer = Scorer(ScorerConfig(model=tiny_models["blip_itm"]))
    samples = demo_samples(2)
    pixels = [scorer.preprocess(decode_image(s["jpg"])) for s in samples]
    texts = [[s["txt"].decode(), "a cat on a sofa"] for s in samples]
    margins, own = scorer.raw(pixels, texts, "itm"), scorer(pixels, texts)
    assert [sigmoid(m) for group in margins for m in group] == pytest.approx([v for g in own for v in g], abs=1e-6)


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


def test_the_cli_writes_what_filter_reads(marked, tmp_path, monkeypatch):
    monkeypatch.setattr("capfilt.models.scorer.Scorer", lambda config: MarkedScorer())
    result = CliRunner().invoke(app, ["calibrate", str(marked), "--filter", "marked", "--out",
                                      str(tmp_path / "cal.json"), "--negatives", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out ROC AUC on 12 images (12 matched, 24 mismatched pairs): itm 0.000, itc 1.000; calibrated: itc" \
        in result.output and "100% of matched pairs kept, 100% of mismatched removed" in result.output
    assert Calibration.read(str(tmp_path / "cal.json")).specs == [str(marked)]


def test_a_random_filter_is_refused_in_one_line(tiny_models, shards):
    """The tiny random BLIP ranks these pairs below chance on both scores: no calibration, exit 2."""
    human, _, root = shards
    result = CliRunner().invoke(app, ["calibrate", str(human), "--filter", tiny_models["blip_itm"], "--out",
                                      str(root / "random.json"), "--negatives", "3", "--batch-size", "4"])
    assert result.exit_code == 2 and "does not tell matched from mismatched pairs" in result.output
    assert not (root / "random.json").exists()


@pytest.mark.parametrize("kind", ["itm", "itc"])
def test_filter_scores_with_the_calibrated_probability(tiny_models, shards, kind):
    _, corpus, root = shards
    calibration = Calibration(score=kind, slope=3.0, bias=-0.5, filter=tiny_models["blip_itm"], specs=[],
                              clean_text=False, auc={}, pairs={}, at_half={})
    (root / f"{kind}.json").write_text(calibration.to_json())
    out = root / f"out-{kind}"
    result = CliRunner().invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"], "--calibration",
                                      str(root / f"{kind}.json"), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    scorer = Scorer(ScorerConfig(model=tiny_models["blip_itm"]))
    samples = demo_samples(4, start=6)
    pixels = [scorer.preprocess(decode_image(s["jpg"])) for s in samples]
    texts = [[s["txt"].decode()] for s in samples]
    expected = {s["__key__"]: calibration(v[0]) for s, v in zip(samples, scorer.raw(pixels, texts, kind))}
    assert {r["key"]: r["web_score"] for r in rows} == pytest.approx(expected, abs=1e-6)
    recorded = json.loads((out / MANIFEST).read_text())["settings"]["filter"]["calibration"]
    assert Calibration(**recorded) == calibration
    # the same output resumes; the bare filter (no calibration) is another run
    again = CliRunner().invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"], "--calibration",
                                     str(root / f"{kind}.json"), "--out", str(out), "--workers", "0"])
    assert again.exit_code == 0, again.output
    bare = CliRunner().invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"], "--out", str(out),
                                    "--workers", "0"])
    assert bare.exit_code == 2 and "other settings (filter)" in bare.output


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


def test_a_run_without_calibration_records_none_so_older_outputs_still_resume(tiny_models, shards):
    _, corpus, root = shards
    out = root / "bare"
    result = CliRunner().invoke(app, ["filter", str(corpus), "--filter", tiny_models["blip_itm"], "--out", str(out),
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "calibration" not in json.loads((out / MANIFEST).read_text())["settings"]["filter"]
