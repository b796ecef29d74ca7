"""Captioner and filter on tiny checkpoints loaded through from_pretrained(dir)."""

import re

import pytest
import torch
from helpers import demo_samples
from transformers import Blip2ForImageTextRetrieval, BlipForImageTextRetrieval

from capfilt import CapfiltError
from capfilt.data.reader import decode_image
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Scorer
from capfilt.settings import CaptionerConfig, ScorerConfig


@pytest.fixture(scope="module")
def images():
    return [decode_image(s["jpg"]) for s in demo_samples(3)]


def test_blip_itm_score_uses_enc_token(tiny_models, images):
    scorer = Scorer(ScorerConfig(model=tiny_models["blip_itm"]))
    texts = ["a dog on the grass", "two people at a table"]
    inputs = [scorer.preprocess(image) for image in images[:1]]
    ours = scorer(inputs, [texts])[0]
    pixels = inputs[0]["pixel_values"]

    # The same model, called the plain HF way, with [ENC] put in place of [CLS] by hand.
    model = BlipForImageTextRetrieval.from_pretrained(tiny_models["blip_itm"]).eval()
    tokens = scorer.tokenizer(texts, padding="longest", return_tensors="pt")
    enc_ids = tokens.input_ids.clone()
    enc_ids[:, 0] = scorer.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        logits = model(input_ids=enc_ids, pixel_values=pixels.repeat(2, 1, 1, 1),
                       attention_mask=tokens.attention_mask, use_itm_head=True).itm_score
        cls_logits = model(input_ids=tokens.input_ids, pixel_values=pixels.repeat(2, 1, 1, 1),
                           attention_mask=tokens.attention_mask, use_itm_head=True).itm_score
    assert ours == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-5)
    assert ours != pytest.approx(cls_logits.softmax(-1)[:, 1].tolist(), abs=1e-4)  # [CLS] would score otherwise


def test_blip2_itm_score_matches_hf_forward(tiny_models, images):
    scorer = Scorer(ScorerConfig(model=tiny_models["blip2_itm"]))
    texts = [["a red bus", "a cat on a bed", "people"], ["a plate of food"]]
    inputs = [scorer.preprocess(image) for image in images[:2]]
    ours = scorer(inputs, texts)
    pixels = torch.cat([one["pixel_values"] for one in inputs])

    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_models["blip2_itm"]).eval()
    for i, group in enumerate(texts):
        tokens = scorer.tokenizer(group, padding="longest", return_tensors="pt")
        with torch.no_grad():
            out = model(pixel_values=pixels[i : i + 1].repeat(len(group), 1, 1, 1), input_ids=tokens.input_ids,
                        attention_mask=tokens.attention_mask, use_image_text_matching_head=True)
        assert ours[i] == pytest.approx(out.logits_per_image.softmax(-1)[:, 1].tolist(), abs=1e-5)


@pytest.mark.parametrize("name", ["blip_itm", "blip2_itm"])
def test_vision_tower_runs_once_per_batch(tiny_models, images, name):
    scorer = Scorer(ScorerConfig(model=tiny_models[name]))
    calls = []
    scorer.model.vision_model.register_forward_hook(lambda module, args, out: calls.append(len(args[0]) if args else 0))
    scorer([scorer.preprocess(image) for image in images], [["a", "b", "c", "d"], ["e", "f"], ["g"]])
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["blip_captioner", "blip2_captioner"])
def test_captioner_gives_k_captions_reproducibly(tiny_models, images, name):
    captioner = Captioner(CaptionerConfig(model=tiny_models[name], num_captions=3))
    pixels = [captioner.preprocess(image) for image in images[:2]]
    first = captioner(pixels, seed=7)
    assert [len(c) for c in first] == [3, 3]
    assert all(isinstance(c, str) and c for caps in first for c in caps)
    assert captioner(pixels, seed=7) == first
    assert captioner(pixels, seed=8) != first


def test_captioner_removes_prompt_and_respects_lengths(tiny_models, images):
    config = CaptionerConfig(model=tiny_models["blip_captioner"], min_length=8, max_length=12)
    captioner = Captioner(config)
    # The prompt is [DEC] + "a picture of": 4 tokens, so 4..8 new tokens (word-level vocabulary: 1 token a word).
    for (caption,) in captioner([captioner.preprocess(image) for image in images], seed=0):
        assert 4 <= len(caption.split()) <= 8
    greedy = Captioner(CaptionerConfig(model=tiny_models["blip_captioner"], sampling="greedy"))
    inputs = [greedy.preprocess(images[0])]
    pixels = inputs[0]["pixel_values"]
    prefix = torch.tensor([greedy.prefix + [greedy.prefix[0]]])
    full = greedy.model.generate(pixels, input_ids=prefix, **greedy.config.generation_kwargs(len(greedy.prefix)))
    decoded = greedy.tokenizer.decode(full[0], skip_special_tokens=True)
    assert decoded.startswith("a picture of")
    assert greedy(inputs)[0][0] == decoded[len("a picture of"):].strip()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampling="greedy", num_captions=2), "greedy"),
        (dict(sampling="beam", num_beams=2, num_captions=3), "num-beams"),
        (dict(sampling="topk"), "unknown sampling"),
        (dict(dtype="fp8"), "unknown dtype"),
        (dict(top_p=0), "top-p"),
    ],
)
def test_captioner_config_rejects_bad_options(kwargs, message):
    with pytest.raises(CapfiltError, match=message):
        CaptionerConfig(model="x", **kwargs)


def test_wrong_head_and_missing_model_are_clear(tiny_models, tmp_path):
    from transformers import BertConfig

    with pytest.raises(CapfiltError, match="is a BLIP image-text matching .ITM. checkpoint, not a BLIP captioning "
                                           "checkpoint such as Salesforce/blip-image-captioning-large") as err:
        Captioner(CaptionerConfig(model=tiny_models["blip_itm"]))
    assert not re.search(r"[a-z]For[A-Z]", str(err.value))  # what users call it, not transformers' class names
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(CapfiltError, match="is a 'bert' model, which capfilt cannot use as a filter: a filter must "
                                           "be a BLIP image-text matching") as err:
        Scorer(ScorerConfig(model=str(tmp_path / "bert")))
    assert not re.search(r"[a-z]For[A-Z]|QFormerModel", str(err.value))
    with pytest.raises(CapfiltError, match="no such model directory"):
        Scorer(ScorerConfig(model=str(tmp_path / "nope")))


def test_enc_token_found_without_tokenizer_entry():
    from types import SimpleNamespace

    from transformers import BertTokenizer

    from capfilt.models.scorer import enc_token_id

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog"])}

    def text(vocab_size, bos=None):
        return SimpleNamespace(vocab_size=vocab_size, bos_token_id=bos)

    with_enc = BertTokenizer(vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    assert enc_token_id(with_enc, text(8, bos=6)) == 7
    # HF's BLIP tokenizers may carry [DEC] but not [ENC]; BLIP's embedding row for [ENC] follows [DEC].
    without = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    assert enc_token_id(without, text(len(without) + 1)) == len(without)
    # The Hub's BLIP repos ship plain BERT (neither token): [DEC] is the config's bos id, [ENC] the next row.
    plain = BertTokenizer(vocab=vocab)
    assert enc_token_id(plain, text(len(plain) + 2, bos=len(plain))) == len(plain) + 1
    for tokenizer, config in ((without, text(len(without))), (plain, text(len(plain) + 1, bos=len(plain))),
                              (plain, text(len(plain) + 2, bos=None)), (plain, text(len(plain) + 2, bos=2))):
        with pytest.raises(CapfiltError, match="ENC"):
            enc_token_id(tokenizer, config)


@pytest.mark.parametrize("name", ["blip_captioner", "blip2_captioner", "blip_itm", "blip2_itm"])
def test_bf16_runs(tiny_models, images, name):
    if "captioner" in name:
        model = Captioner(CaptionerConfig(model=tiny_models[name], dtype="bf16", sampling="greedy"))
        assert len(model([model.preprocess(image) for image in images])) == len(images)
    else:
        model = Scorer(ScorerConfig(model=tiny_models[name], dtype="bf16"))
        scores = model([model.preprocess(image) for image in images], [["a dog"], ["a cat", "a bus"], []])
        assert all(0.0 <= s <= 1.0 for row in scores for s in row)


def test_a_caption_ends_at_its_first_line_break(tiny_models, images, monkeypatch):
    """An LLM may run on past the caption; what follows the first line break is not part of it."""
    captioner = Captioner(CaptionerConfig(model=tiny_models["blip2_captioner"], num_captions=2))
    pixels = [captioner.preprocess(images[0])]
    monkeypatch.setattr(captioner.tokenizer, "batch_decode",
                        lambda ids, **kw: [" a dog on a sofa\nA: 3.9/5 = 20", "\na cat\n\nQ: what?"][: len(ids)])
    assert captioner(pixels, seed=0) == [["a dog on a sofa", "a cat"]]
