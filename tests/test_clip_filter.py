"""CLIP and SigLIP as `--filter`: tiny random models built from the real Hub files of openai/clip-vit-base-patch32
and google/siglip-so400m-patch14-384 (tests/hub_files: SigLIP so400m is a stand-in for the base size, CLIP's
processor and tokenizer configs are a re-saved copy's; see their SOURCES.md), saved and loaded back through the
CLI's own path. Scores against the models' own forward, long captions, the score kind through filter /
bootstrap / select / stats / report, calibration, any captioner with these filters, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    REPO,
    cli,
    counts,
    demo_samples,
    interrupted_at_batch,
    mixed_shards,
    outputs,
    read_json,
    tar_members,
    write_tar,
)

from capfilt.bootstrap.pipeline import run
from capfilt.bootstrap.selection import DEFAULT_THRESHOLDS
from capfilt.data.reader import decode_image
from capfilt.data.schema import COSINE, MANIFEST, PROBABILITY
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Calibration, Scorer
from capfilt.settings import CaptionerConfig, RunConfig, ScorerConfig, SelectionConfig
from capfilt.testing import WORDS, build_dual_encoders, build_siglip2_naflex

# ~130 words, past both text towers (77 and 64 tokens), and passing the caption rules (no repeated n-grams).
LONG = "A photo of " + " ".join(WORDS) + " and then " + " ".join(reversed(WORDS)) + " on the grass."


@pytest.fixture(scope="module")
def filters(tmp_path_factory) -> dict[str, str]:
    return build_dual_encoders(REPO / "tests" / "hub_files", tmp_path_factory.mktemp("dual"))


def inputs_of(scorer, images) -> list[dict]:
    """Each image's inputs as the DataLoader workers make them for this filter."""
    return [scorer.preprocess(image) for image in images]


def _images_and_texts(n: int = 3):
    samples = demo_samples(n)
    images = [decode_image(s["jpg"]) for s in samples]
    texts = [[s["txt"].decode(), samples[(i + 1) % n]["txt"].decode(), LONG] for i, s in enumerate(samples)]
    return images, texts


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_scores_equal_what_the_models_own_forward_gives(filters, family):
    """Each image with its captions through HF's processor and model forward: SigLIP's P(match) is
    sigmoid(logits_per_image) (its scale and bias inside), CLIP's score is logits_per_image / exp(logit_scale),
    the cosine; the long caption cut as the processor cuts it (SigLIP padded to 64 tokens, as it was trained)."""
    from transformers import AutoModel, AutoProcessor

    scorer = Scorer(ScorerConfig(model=filters[family], device="cpu"))
    images, texts = _images_and_texts()
    ours = scorer(inputs_of(scorer, images), texts)

    model, processor = AutoModel.from_pretrained(filters[family]).eval(), AutoProcessor.from_pretrained(filters[family])
    length = 64 if family == "siglip" else 77
    padding = "max_length" if family == "siglip" else True
    for image, captions, scores in zip(images, texts, ours):
        inputs = processor(text=captions, images=[image], padding=padding, truncation=True, max_length=length,
                           return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits_per_image[0]
        expected = torch.sigmoid(logits) if family == "siglip" else logits / model.logit_scale.exp()
        assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    if family == "siglip":  # the real file's tokenizer gives no attention mask, and the scale and bias count
        assert "attention_mask" not in inputs and model.logit_bias.item() == -1.0
        assert scorer.raw_scores == ("logit",) and not scorer.cosine
    else:
        assert scorer.raw_scores == ("cosine",) and scorer.cosine


@pytest.mark.parametrize("family, positions", [("clip", 77), ("siglip", 64)])
def test_a_caption_longer_than_the_text_tower_is_cut_and_counted(filters, family, positions):
    scorer = Scorer(ScorerConfig(model=filters[family], device="cpu"))
    assert scorer.max_text_length == positions == scorer.model.config.text_config.max_position_embeddings
    images, _ = _images_and_texts(1)
    pixels = inputs_of(scorer, images)
    words = LONG.split()
    longer = " ".join(words + words)  # the same first tokens, twice as long
    first, second = scorer(pixels, [[LONG, longer, "a dog"]])[0], scorer.captions_truncated
    assert second == 2 and first[0] == pytest.approx(first[1], abs=1e-6)  # only the first tokens are read
    scorer(pixels, [["a dog"]])
    assert scorer.captions_truncated == 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six demo photos, one with a caption past both text towers' lengths."""
    samples = demo_samples(6)
    samples[2] = {**samples[2], "txt": LONG.encode()}
    folder = tmp_path_factory.mktemp("corpus") / "in"
    folder.mkdir()
    write_tar(folder / "part-00000.tar", samples)
    return folder


def test_clip_filter_records_a_cosine_and_stats_report_and_select_say_so(filters, corpus, tmp_path):
    out = tmp_path / "clip"
    result = cli("filter", corpus, "--out", out, "--filter", filters["clip"], "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    settings = read_json(out / MANIFEST)["settings"]
    assert settings["filter"]["score_kind"] == COSINE
    assert settings["selection"]["threshold"] == DEFAULT_THRESHOLDS[COSINE] == 0.28  # not 0.5, a probability's
    assert "scores are       cosine similarity" in result.output
    assert "captions cut     1 " in result.output
    assert read_json(out / "part-00000_stats.json")["captions_truncated"] == 1
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    scores = [r["web_score"] for r in rows]
    assert all(-1 <= s <= 1 for s in scores) and min(scores) < 0.5  # cosines, not probabilities
    kept = [r for r in rows if r["status"] == "ok"]
    assert all(r["web_score"] >= 0.28 for r in kept) and all(r["web_score"] < 0.28 for r in rows if r not in kept)

    report = cli("report", out)
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert "scores: cosine similarity (CLIP score)" in page and "Score histograms (cosine similarity" in page
    assert "captions cut to the filter&#39;s text length" in page or "captions cut to the filter's text length" in page
    assert "0.28 (run)" in page and "0.15" in page  # the sweep's rows are on the cosine scale

    middle = max(0.0, sorted(scores)[len(scores) // 2])  # keeps half the photos, whatever the random weights
    selected = tmp_path / "selected"
    result = cli("select", corpus, "--from", out, "--out", selected, "--threshold", middle, "--quiet")
    assert result.exit_code == 0, result.output
    assert read_json(selected / MANIFEST)["settings"]["filter"]["score_kind"] == COSINE
    assert "scores are       cosine similarity" in result.output and "captions cut     1 " in result.output
    blocks = [json.loads(data)["capfilt"] for name, data in tar_members(selected / "part-00000.tar")
              if name.endswith(".json")]
    assert len(blocks) == sum(s >= middle for s in scores) >= 3
    assert all(b["score_kind"] == COSINE and b["threshold"] == middle for b in blocks)


def test_siglip_filter_scores_its_own_probability_at_one_half(filters, corpus, tmp_path):
    out = tmp_path / "siglip"
    result = cli("filter", corpus, "--out", out, "--filter", filters["siglip"], "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    settings = read_json(out / MANIFEST)["settings"]
    assert "score_kind" not in settings["filter"] and settings["selection"]["threshold"] == 0.5
    assert "scores are       P(match)" in result.output and "captions cut     1 " in result.output
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert all(0 < r["web_score"] < 1 for r in rows)
    assert cli("report", out).exit_code == 0
    assert "scores: P(match)" in (out / "report.html").read_text()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_any_captioner_with_these_filters_scores_its_captions(filters, tiny_models, corpus, tmp_path, family):
    """A BLIP captioner (384 px, its own processor) with a CLIP (224) or SigLIP (384, other mean) filter: two
    preprocessings, no shared tower; every recorded score is the filter's on that photo and caption."""
    out = tmp_path / family
    result = cli("bootstrap", corpus, "--out", out, "--captioner", tiny_models["blip_captioner"], "--filter",
                 filters[family], "--num-captions", 2, "--batch-size", 4, "--workers", 0, "--quiet",
                 "--no-caption-rules")  # a random captioner's words would fail them: here every caption is scored
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert all(len(r["synthetic_captions"]) >= 1 and len(r["synthetic_scores"]) == len(r["synthetic_captions"])
               for r in rows)
    scorer = Scorer(ScorerConfig(model=filters[family], device="cpu"))
    images = {s["__key__"]: decode_image(s["jpg"]) for s in demo_samples(6)}
    for row in rows:
        recorded = [row["web_score"], *row["synthetic_scores"]]
        expected = scorer(inputs_of(scorer, [images[row["key"]]]),
                          [[row["web_caption"], *row["synthetic_captions"]]])[0]
        assert recorded == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def human(tmp_path_factory) -> Path:
    samples = []
    for sample in demo_samples(8):  # five human captions each, as a capfilt block lists them
        meta = json.loads(sample["json"])
        block = {"candidates": [{"caption": c, "source": "human", "score": None, "kept": True}
                                for c in meta["capfilt_demo"]["human_captions"]], "captioner": None, "filter": None}
        samples.append({**sample, "json": json.dumps({"capfilt": block}).encode()})
    return write_tar(tmp_path_factory.mktemp("human") / "human.tar", samples)


@pytest.mark.parametrize("family, raw", [("clip", "cosine"), ("siglip", "logit")])
def test_calibrate_fits_each_filters_raw_score_and_filter_uses_it(filters, human, corpus, tmp_path, family, raw):
    """`capfilt calibrate` on held-out human pairs fits P(match) of CLIP's cosine or SigLIP's logit (a tiny random
    filter tells the pairs apart or is refused in one line, as a BLIP one); a run with the fit scores P(match)
    of that raw score, records a probability and defaults to 0.5."""
    fitted = tmp_path / "cal.json"
    result = cli("calibrate", human, "--filter", filters[family], "--out", fitted, "--negatives", 3)
    if result.exit_code == 2:
        assert "does not tell matched from mismatched pairs" in result.output and raw in result.output
        assert not fitted.exists()
        fitted.write_text(Calibration(score=raw, slope=4.0, bias=-0.3, filter=filters[family], specs=[],
                                      clean_text=False, auc={}, pairs={}, at_half={}).to_json())
    else:
        assert result.exit_code == 0, result.output
        assert f"{raw} " in result.output and f"calibrated: {raw}" in result.output
    calibration = Calibration.read(str(fitted))
    assert calibration.score == raw

    out = tmp_path / "out"
    result = cli("filter", corpus, "--out", out, "--filter", filters[family], "--calibration", fitted,
                 "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    settings = read_json(out / MANIFEST)["settings"]
    assert "score_kind" not in settings["filter"] and settings["selection"]["threshold"] == 0.5
    scorer = Scorer(ScorerConfig(model=filters[family], device="cpu"))
    samples = demo_samples(6)
    samples[2] = {**samples[2], "txt": LONG.encode()}
    values = scorer.raw(inputs_of(scorer, [decode_image(s["jpg"]) for s in samples]),
                        [[s["txt"].decode()] for s in samples], raw)
    expected = {s["__key__"]: calibration(v[0]) for s, v in zip(samples, values)}
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert {r["key"]: r["web_score"] for r in rows} == pytest.approx(expected, abs=1e-6)


def test_metaclip_2_scores_its_cosine(filters, tmp_path):
    """No real MetaCLIP 2 files are at hand: a tiny MetaClip2Model from its config class's defaults (narrowed),
    with the CLIP checkpoint's tokenizer and processor as stand-ins for its own (XLM-V's vocabulary)."""
    import shutil

    from transformers import MetaClip2Config, MetaClip2Model

    path = tmp_path / "metaclip2"
    shutil.copytree(filters["clip"], path)
    narrow = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    torch.manual_seed(0)
    model = MetaClip2Model(MetaClip2Config(
        text_config={**narrow, "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={**narrow, "image_size": 224, "patch_size": 32}, projection_dim=16)).eval()
    model.save_pretrained(path)
    scorer = Scorer(ScorerConfig(model=str(path), device="cpu"))
    assert scorer.cosine and scorer.raw_scores == ("cosine",)
    images, texts = _images_and_texts(1)
    ours = scorer(inputs_of(scorer, images), texts)[0]
    with torch.no_grad():
        tokens = scorer.tokenizer(texts[0], padding=True, truncation=True, max_length=77, return_tensors="pt")
        logits = model(pixel_values=inputs_of(scorer, images)[0]["pixel_values"], **tokens).logits_per_image[0]
    assert ours == pytest.approx((logits / model.logit_scale.exp()).tolist(), abs=1e-5)


def test_a_calibration_of_another_filters_score_is_one_line(filters, corpus, tmp_path):
    (tmp_path / "itm.json").write_text(Calibration(score="itm", slope=1.0, bias=0.0, filter="blip", specs=[],
                                                   clean_text=False, auc={}, pairs={}, at_half={}).to_json())
    result = cli("filter", corpus, "--out", tmp_path / "out", "--filter", filters["clip"], "--calibration",
                 tmp_path / "itm.json")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "'itm' score" in result.output and "cosine" in result.output


def test_unsupported_checkpoints_are_one_line_naming_the_families(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    result = cli("filter", tmp_path / "vit", "--out", tmp_path / "o1", "--filter", tmp_path / "vit")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    for family in ("BLIP", "BLIP-2", "CLIP", "SigLIP", "SigLIP 2 NaFlex", "MetaCLIP 2", "capfilt Q-Former"):
        assert family in result.output


def test_a_siglip2_naflex_filter_scores_each_image_at_its_own_aspect_ratio(tmp_path):
    """SigLIP 2 NaFlex (no real files at hand: see `build_siglip2_naflex`): each image's patches, mask and grid
    from its own processor in the workers, collated; the scores equal the model's forward on the processor's
    batch, and a landscape and a portrait photo get different grids."""
    from transformers import AutoImageProcessor, AutoModel

    path = build_siglip2_naflex(tmp_path / "naflex")
    scorer = Scorer(ScorerConfig(model=path, device="cpu"))
    assert not scorer.cosine and scorer.raw_scores == ("logit",) and scorer.max_text_length == 64
    images, texts = _images_and_texts(2)
    images[1] = images[1].rotate(90, expand=True)  # portrait: another patch grid
    inputs = inputs_of(scorer, images)
    assert inputs[0]["spatial_shapes"].tolist() != inputs[1]["spatial_shapes"].tolist()
    ours = scorer(inputs, texts)
    assert scorer.captions_truncated == 2

    model, processor = AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)
    for image, captions, scores in zip(images, texts, ours):
        tokens = scorer.tokenizer(captions, padding="max_length", truncation=True, max_length=64,
                                  return_tensors="pt")
        with torch.no_grad():
            logits = model(**processor(images=[image], return_tensors="pt"), **tokens).logits_per_image[0]
        assert scores == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)


def test_the_hubs_older_clip_preprocessor_gives_the_same_pixels(filters, tmp_path):
    """The Hub's own preprocessor_config.json of openai/clip-vit-base-patch32 is the old CLIPFeatureExtractor
    layout (ints, as its SOURCES.md describes; the bytes were not found), the re-saved copy's the new one: same
    224x224 crop, same pixels."""
    import shutil

    from capfilt.models.loading import load_image_transform

    old = tmp_path / "old"
    shutil.copytree(filters["clip"], old)
    saved = json.loads((old / "preprocessor_config.json").read_text())
    (old / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": saved["image_mean"],
        "image_std": saved["image_std"], "resample": 3, "size": 224}))
    images, _ = _images_and_texts(2)
    vision = Scorer(ScorerConfig(model=filters["clip"], device="cpu")).model.config.vision_config
    new_pixels = load_image_transform(filters["clip"], vision)(images)
    assert new_pixels.shape == (2, 3, 224, 224)
    assert torch.equal(load_image_transform(str(old), vision)(images), new_pixels)


def test_the_threshold_help_states_the_defaults_it_resolves_to():
    help_text = SelectionConfig.__dataclass_fields__["threshold"].metadata["help"]
    assert f"{DEFAULT_THRESHOLDS[PROBABILITY]} for a probability" in help_text
    assert f"{DEFAULT_THRESHOLDS[COSINE]} for a CLIP cosine" in help_text


# ------------------------------------------------------------------------------------------------ resume


def test_a_killed_run_with_a_clip_filter_resumes_to_the_same_bytes(filters, tiny_models, tmp_path):
    shards = mixed_shards(tmp_path / "in")
    stages = (Captioner(CaptionerConfig(model=tiny_models["blip_captioner"], num_captions=2, device="cpu")),
              Scorer(ScorerConfig(model=filters["clip"], device="cpu")))

    def whole(out):
        config = RunConfig(specs=(str(shards),), out=str(out), batch_size=3, workers=0, progress=False)
        return run(config, captioner=stages[0], scorer=stages[1], selection=SelectionConfig())

    whole(tmp_path / "reference")
    out = tmp_path / "resumed"
    with interrupted_at_batch(5), pytest.raises(KeyboardInterrupt):
        whole(out)
    done_before = {p.name for p in out.glob("*_stats.json")}
    assert 0 < len(done_before) < 4
    summary = whole(out)
    assert summary.shards_skipped == len(done_before)
    assert outputs(out) == outputs(tmp_path / "reference")
    assert counts(out) == counts(tmp_path / "reference")
    assert read_json(out / MANIFEST)["settings"]["filter"]["score_kind"] == COSINE
