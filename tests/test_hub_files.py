"""Checkpoints with the real Hub files (tests/hub_files: configs, tokenizers, processors of
Salesforce/blip-image-captioning-base and Salesforce/blip2-opt-2.7b), random weights, only depth shrunk: what
users hand capfilt, run through the same `from_pretrained(dir)` path and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import demo_samples, write_tar
from PIL import Image
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    InstructBlipForConditionalGeneration,
)
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.data.reader import decode_image
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Scorer
from capfilt.settings import CaptionerConfig, ScorerConfig
from capfilt.testing import build_hub_models, build_instructblip

HUB_FILES = Path(__file__).parent / "hub_files"
HF_CLASSES = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration,
              "instructblip": InstructBlipForConditionalGeneration}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub_models")
    models = build_hub_models(HUB_FILES, root)
    for llm in ("t5", "llama"):
        models[f"instructblip_{llm}"] = build_instructblip(HUB_FILES, root / f"instructblip_{llm}", llm=llm)
    return models


@pytest.fixture(scope="module")
def images():
    return [decode_image(s["jpg"]) for s in demo_samples(2)]


def test_blip_itm_with_the_real_tokenizer_scores_as_hf_with_enc(hub, images):
    """The Hub's BLIP tokenizer is plain bert-base-uncased (30,522 tokens); [ENC] is embedding row 30,523."""
    scorer = Scorer(ScorerConfig(model=hub["blip_itm"]))
    assert len(scorer.tokenizer) == 30522 and scorer.first_token == 30523
    texts = ["a dog on the grass", "two people sitting at a table"]
    ours = scorer([scorer.preprocess(images[0])], [texts])[0]

    model = BlipForImageTextRetrieval.from_pretrained(hub["blip_itm"]).eval()
    inputs = AutoProcessor.from_pretrained(hub["blip_itm"])(images=images[:1] * 2, text=texts, padding="longest",
                                                            return_tensors="pt")
    inputs["input_ids"][:, 0] = 30523  # [ENC] in place of [CLS], as BLIP trained its ITM head
    with torch.no_grad():
        logits = model(**inputs, use_itm_head=True).itm_score
    assert ours == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-5)


def test_itc_similarity_equals_hf_without_the_matching_head(hub, images):
    """The raw score `capfilt calibrate` may pick: HF's cosine path (use_itm_head=False for BLIP; for BLIP-2
    use_image_text_matching_head=False, the best query), one caption per image."""
    texts = ["a dog on the grass", "two people sitting at a table"]
    for name, cls, flag, field in (("blip_itm", BlipForImageTextRetrieval, "use_itm_head", "itm_score"),
                                   ("blip2_itm", Blip2ForImageTextRetrieval, "use_image_text_matching_head",
                                    "logits_per_image")):
        scorer = Scorer(ScorerConfig(model=hub[name]))
        inputs = [scorer.preprocess(image) for image in images]
        ours = [group[0] for group in scorer.raw(inputs, [[t] for t in texts], "itc")]
        pixels = torch.cat([one["pixel_values"] for one in inputs])
        model = cls.from_pretrained(hub[name]).eval()
        model.config.image_token_index = None  # HF's processor would prepend the queries' tokens otherwise
        tokens = scorer.tokenizer(texts, padding="longest", return_tensors="pt")
        with torch.no_grad():
            sims = model(pixel_values=pixels, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         **{flag: False})[field]
        assert ours == pytest.approx(sims.diagonal().tolist(), abs=1e-5), name


LLM_CAPTIONERS = ["blip2_captioner", "instructblip_t5", "instructblip_llama"]


@pytest.mark.parametrize("name", LLM_CAPTIONERS)
@pytest.mark.parametrize("prompt", [None, "a picture of "])
def test_llm_prompts_end_on_a_word_not_a_lone_space(hub, name, prompt):
    """OPT's byte-level BPE makes "a picture of " `a Ġpicture Ġof Ġ`; sentencepiece makes a lone `▁`."""
    captioner = Captioner(CaptionerConfig(model=hub[name], prompt=prompt))
    last = [t for t in captioner.prefix if t not in captioner.tokenizer.all_special_ids][-1]
    assert captioner.tokenizer.decode([last]).strip(), captioner.tokenizer.convert_ids_to_tokens(captioner.prefix)


def test_default_prompts_are_each_kinds_own(hub):
    prompts = {name: Captioner(CaptionerConfig(model=hub[name])).prompt
               for name in ("blip_captioner", "blip2_captioner", "instructblip_t5")}
    assert prompts == {"blip_captioner": "a picture of ", "blip2_captioner": "a photo of",
                       "instructblip_t5": "A short image caption:"}


@pytest.mark.parametrize("name", ["blip_captioner", *LLM_CAPTIONERS])
def test_the_prompt_is_removed_for_every_tokenizer_kind(hub, images, name):
    """WordPiece (BLIP), byte-level BPE (OPT), sentencepiece unigram (Flan-T5) and BPE (Vicuna/Llama): capfilt's
    greedy caption is what the model generates after the prompt when called by hand through its own processor."""
    captioner = Captioner(CaptionerConfig(model=hub[name], sampling="greedy", min_length=0, max_length=24))
    ours = captioner([captioner.preprocess(image) for image in images], seed=0)

    model = HF_CLASSES[captioner.kind].from_pretrained(hub[name]).eval()
    processor = AutoProcessor.from_pretrained(hub[name])
    inputs = processor(images=images, text=[captioner.prompt] * len(images), return_tensors="pt")
    kwargs = captioner.config.generation_kwargs(prompt_tokens=0 if captioner.encoder_decoder else len(captioner.prefix))
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    if captioner.kind == "blip":  # BLIP returns [DEC] and the prompt before the caption
        out = out[:, len(captioner.prefix):]
    elif not model.config.text_config.is_encoder_decoder:  # decoder-only LLMs echo their input ids
        out = out[:, inputs["input_ids"].shape[1]:]
    theirs = [[t.strip().split("\n")[0].strip()] for t in processor.batch_decode(out, skip_special_tokens=True)]
    assert ours == theirs
    assert all(caption for captions in ours for caption in captions)


@pytest.mark.parametrize("name,prompt_in_output", [("instructblip_t5", False), ("instructblip_llama", True),
                                                    ("blip2_captioner", True)])
def test_lengths_count_the_prompt_only_where_the_output_holds_it(hub, images, name, prompt_in_output, monkeypatch):
    """--min-length 10 --max-length 30 mean 10..30 caption tokens behind Flan-T5, whose output holds no prompt."""
    captioner = Captioner(CaptionerConfig(model=hub[name], sampling="greedy"))
    seen = {}
    real = captioner.model.generate

    def generate(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", generate)
    captioner([captioner.preprocess(images[0])], seed=0)
    prompt = len(captioner.prefix) if prompt_in_output else 0
    assert (seen["min_new_tokens"], seen["max_new_tokens"]) == (max(0, 10 - prompt), 30 - prompt)


def _old_processor(hub, tmp_path, size) -> str:
    """blip-image-captioning-base as its first processor upload had it, or with another size."""
    path = tmp_path / "blip_old_processor"
    shutil.copytree(hub["blip_captioner"], path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**config, "size": size}))
    return str(path)


def test_an_older_processor_file_gives_the_towers_square(hub, tmp_path):
    captioner = Captioner(CaptionerConfig(model=_old_processor(hub, tmp_path, {"shortest_edge": 384})))
    inputs = [captioner.preprocess(Image.new("RGB", (640, 384)))]
    assert tuple(inputs[0]["pixel_values"].shape) == (1, 3, 384, 384)
    assert len(captioner(inputs, seed=0)[0]) == 1


def test_a_transform_that_cannot_fit_the_tower_is_one_line(hub, tmp_path, images):
    path = Path(_old_processor(hub, tmp_path, {"height": 384, "width": 384}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "crop_size": 224}))
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "part-00000.tar", demo_samples(2))
    result = CliRunner().invoke(app, ["caption", str(shards), "--out", str(tmp_path / "out"), "--captioner",
                                      str(path), "--workers", "0", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "preprocessor_config.json" in result.output and "384x384" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, RuntimeError)
    assert 'set "size" and "crop_size" to {"height": 384, "width": 384}' in result.output
    config = json.loads((path / "preprocessor_config.json").read_text())  # the fix it names, applied
    square = {"height": 384, "width": 384}
    (path / "preprocessor_config.json").write_text(json.dumps({**config, "size": square, "crop_size": square}))
    captioner = Captioner(CaptionerConfig(model=str(path)))
    assert tuple(captioner.preprocess(images[0])["pixel_values"].shape) == (1, 3, 384, 384)


def test_towers_that_interpolate_keep_their_own_crops(tmp_path):
    """DINOv2 says image_size 518 but crops 224 and interpolates its position embeddings: not refused."""
    from transformers import BitImageProcessor, Dinov2Config

    from capfilt.models.loading import load_image_transform

    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    transform = load_image_transform(str(tmp_path), Dinov2Config(image_size=518))
    assert tuple(transform([Image.new("RGB", (640, 384))]).shape) == (1, 3, 224, 224)


PAIRS = [("blip_captioner", "blip_itm"), ("blip2_captioner", "blip2_itm"), ("instructblip_t5", "blip_itm"),
         ("instructblip_llama", "blip2_itm")]


@pytest.mark.parametrize("captioner,filter_", PAIRS)
def test_caption_filter_and_bootstrap_run_on_real_files(hub, tmp_path, captioner, filter_):
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "part-00000.tar", demo_samples(4))
    # Random weights write gibberish, which the caption rules rightly drop: here every caption goes to the filter.
    common = ["--batch-size", "4", "--workers", "0", "--quiet", "--no-caption-rules"]

    def cli(*args):
        result = CliRunner().invoke(app, [str(a) for a in args] + common)
        assert result.exit_code == 0, result.output
        return pq.read_table(Path(args[3]) / "part-00000.parquet").to_pylist()

    captioned = cli("caption", shards, "--out", tmp_path / "cap", "--captioner", hub[captioner])
    assert [r["status"] for r in captioned] == ["ok"] * 4
    assert all(len(r["synthetic_captions"]) == 1 and r["synthetic_captions"][0] for r in captioned)

    filtered = cli("filter", tmp_path / "cap", "--out", tmp_path / "filt", "--filter", hub[filter_],
                   "--threshold", "0")
    assert [r["synthetic_captions"] for r in filtered] == [r["synthetic_captions"] for r in captioned]
    assert all(0 <= s <= 1 for r in filtered for s in [r["web_score"], *r["synthetic_scores"]])

    booted = cli("bootstrap", shards, "--out", tmp_path / "boot", "--captioner", hub[captioner], "--filter",
                 hub[filter_], "--num-captions", "2")
    assert len(booted) == 4  # 2 captions an image, scored; fewer where the two came out the same
    assert all(1 <= len(r["synthetic_scores"]) == len(r["synthetic_captions"]) <= 2 for r in booted)
