"""The demo recipe end to end with tiny random frozen parts (no download): every stage of every fold runs, no
photo is judged by a model that trained on it, and the summary agrees with the shards and the output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from capfilt.data.reader import decode_image, read_shard
from capfilt.demo.loop import CALIBRATION, judged_and_trained, run_demo, web_raw_scores
from capfilt.errors import CapfiltError
from capfilt.models import losses
from capfilt.models.scorer import Scorer, sigmoid
from capfilt.settings import DEMO_SHARDS, DemoConfig, ScorerConfig
from capfilt.testing import build_tiny_qformer_parts


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    parts = build_tiny_qformer_parts(tmp / "parts")
    messages = []
    config = DemoConfig(out=str(tmp / "loop"), vision=parts["vision"], llm=parts["llm"], qformer_init=parts["bert"],
                        stage1_steps=2, stage2_steps=2, batch_size=8, num_captions=2, num_query_tokens=4,
                        workers=0, device="cpu")
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("capfilt.demo.loop").addHandler(handler)
    yield config, run_demo(config), messages
    logging.getLogger("capfilt.demo.loop").removeHandler(handler)


def test_every_fold_runs_every_stage_and_the_figures_agree_with_the_output(demo):
    config, summary, messages = demo
    loop = Path(config.out)
    assert [m.split("]")[0] for m in messages] == ["[1/5", "[2/5"] + ["[3/5", "[3/5", "[3/5", "[4/5"] * 2 + ["[5/5"]
    for fold in ("fold-0", "fold-1"):
        for done in ("stage1/config.json", "stage2/config.json", "stage2/llm_tokenizer/tokenizer_config.json",
                     "cleaned/report.html"):
            assert (loop / fold / done).is_file(), (fold, done)

    truth = {s.key: s.meta["capfilt_demo"]["noisy"] for p in sorted(DEMO_SHARDS.glob("demo-*.tar"))
             for s in read_shard(str(p))}
    rows = [r for p in sorted(loop.glob("fold-*/cleaned/*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(truth)  # every photo judged, once
    removed = {r["key"] for r in rows if r["web_caption"] not in (r["kept_captions"] or [])}
    noise = summary.noise
    assert (noise.noisy, noise.clean) == (sum(truth.values()), len(truth) - sum(truth.values())) == (20, 60)
    assert noise.noisy_removed == sum(truth[k] for k in removed)
    assert noise.clean_kept == sum(not truth[k] for k in truth if k not in removed)
    figures = summary.figures
    assert 0.0 <= figures.web_auc <= 1.0 and figures.synthetic_total == 2 * len(truth)
    assert figures.retrieval_chance["text->image R@1"] == pytest.approx(1 / 40)
    assert 0.0 <= figures.bleu4 <= 100.0 and figures.human_bleu4 > figures.bleu4  # tiny random captioners
    text = summary.format()
    assert "ROC AUC" in text and "BLEU-4" in text and "precision of the removals" in text

    for k, fold in enumerate(("fold-0", "fold-1")):  # the filter's score: the calibrated P(match), or the head's own
        calibration, raw = figures.calibrations[k], web_raw_scores(loop / fold, "cpu")
        page = (loop / fold / "cleaned" / "report.html").read_text()
        assert (f"calibrated on its {calibration.score.upper()} score" in page) if calibration else \
            "calibrated" not in page.split("<h2")[0]
        if calibration is not None:  # tiny random models may be refused, as no better than chance
            assert calibration.pairs["images"] == 10
            assert calibration.specs == [str(loop / f"fold-{1 - k}" / CALIBRATION)]
        expected = ({key: calibration(v) for key, v in raw[calibration.score].items()} if calibration
                    else {key: sigmoid(v) for key, v in raw["itm"].items()})
        scored = {r["key"]: r["web_score"] for p in (loop / fold / "cleaned").glob("*.parquet")
                  for r in pq.read_table(p).to_pylist()}
        assert scored == pytest.approx(expected, abs=1e-6)

    again = run_demo(config)  # a rerun finds every stage done
    assert again.seconds["stage 1"] < summary.seconds["stage 1"] or summary.seconds["stage 1"] < 1


def test_no_photo_is_judged_by_a_model_that_trained_on_it(demo):
    config, _, _ = demo
    folds = sorted(Path(config.out).glob("fold-*"))
    pairs = judged_and_trained(folds)
    assert len(pairs) == 2
    for judged, trained in pairs:
        assert len(judged) == 40 and len(trained) == 40
        assert not judged & trained, sorted(judged & trained)[:3]
    assert set().union(*(judged for judged, _ in pairs)) == set().union(*(trained for _, trained in pairs))


def test_calibration_photos_are_held_out_of_training(demo):
    config, _, _ = demo
    folds = sorted(Path(config.out).glob("fold-*"))
    for fold, other in zip(folds, reversed(folds)):
        calibrated = {s.key for s in read_shard(str(other / CALIBRATION))}
        for stage in ("stage1", "stage2"):
            trained = {s.key for spec in json.loads((fold / stage / "capfilt_pretrain.json").read_text())["specs"]
                       for s in read_shard(spec)}
            assert len(calibrated) == 10 and len(trained) == 30 and not calibrated & trained


@torch.no_grad()
def test_the_scorers_itc_is_the_models_own_similarity(demo):
    """Scorer.raw("itc") on a capfilt Q-Former equals the training loss's similarity (best query's cosine)."""
    config, _, _ = demo
    scorer = Scorer(ScorerConfig(model=str(Path(config.out) / "fold-0" / "stage1")))
    samples = [s for s in read_shard(str(Path(config.out) / "fold-0" / "corpus-00000.tar"))][:4]
    inputs = [scorer.preprocess(decode_image(s.image)) for s in samples]
    pixels = torch.cat([one["pixel_values"] for one in inputs])
    captions = [s.web_caption for s in samples]
    tokens = scorer.tokenizer(captions, padding="longest", return_tensors="pt")
    model = scorer.model
    expected = losses.similarities(model.image_feats(model.encode_image(pixels)),
                                   model.text_feats(tokens.input_ids, tokens.attention_mask)).diagonal()
    ours = [group[0] for group in scorer.raw(inputs, [[c] for c in captions], "itc")]
    assert ours == pytest.approx(expected.tolist(), abs=1e-5)


def test_roc_auc_counts_ties_half_and_equals_the_pair_count():
    from capfilt.bootstrap.truth import roc_auc

    assert roc_auc([3.0, 2.0], [1.0, 0.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0
    assert roc_auc([1.0, 2.0], [2.0, 0.0]) == 0.625  # 3 of 4 pairs won, the tie counts half
    assert roc_auc([1.0], []) != roc_auc([1.0], [])  # nan


def test_an_earlier_demos_folds_are_refused_not_mixed(tmp_path):
    """The demo before calibration put every photo of a fold in its human shard: calibrating on 10 of them
    would calibrate on photos the old stage 1 trained on."""
    from capfilt.demo.loop import HUMAN, write_folds

    (tmp_path / "fold-0").mkdir()
    (tmp_path / "fold-0" / HUMAN).write_bytes(b"")
    with pytest.raises(CapfiltError, match="earlier capfilt demo"):
        write_folds(str(DEMO_SHARDS), [tmp_path / "fold-0", tmp_path / "fold-1"])
    assert not (tmp_path / "fold-1").exists()


def test_without_the_demo_extra_the_demo_says_what_to_install_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(CapfiltError, match=r"pip install 'capfilt\[demo\]'"):
        run_demo(DemoConfig(out=str(tmp_path / "loop")))
    assert not (tmp_path / "loop").exists()
