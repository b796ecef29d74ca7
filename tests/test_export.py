"""`capfilt export`: tiny capfilt run directories exported to transformers' BLIP-2 classes must score and caption
exactly as capfilt does, through transformers alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.errors import CapfiltError
from capfilt.models.qformer import QFormerModel
from capfilt.settings import QFormerShape
from capfilt.testing import WORDS, _bert_tokenizer, _image_processor, _llm_tokenizer
from capfilt.train.export import export
from capfilt.train.parts import attach_language_model, build_stage1

SHAPE = QFormerShape(hidden_size=32, num_layers=2, num_heads=2, num_query_tokens=4, embed_dim=16,
                     max_text_length=16, dropout=0.0)
CAPTIONS = ["a dog on the grass", "two cats sitting on a red bed", "a bus"]
PROMPT = "a picture of"


def _plain_llm_tokenizer():
    """capfilt.testing's LLM tokenizer without `<image>`, so the export has to find it a row."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _llm(family: str, tok):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "opt":  # 8 spare rows past the tokenizer, as OPT's real checkpoints have
        config = OPTConfig(vocab_size=len(tok) + 8, hidden_size=32, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                           init_std=0.2, **ids)
    elif family == "gpt2":  # tied output embeddings, no spare row
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                            initializer_range=0.2, **ids)
    else:  # llama: untied lm_head, no spare row
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False, initializer_range=0.2, **ids)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A saved stage-1 run directory on a tiny BLIP-2 vision tower, weights randomised past their init."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, initializer_range=0.02)
    Blip2VisionModel(vision).save_pretrained(root / "tower")
    tokenizer = _bert_tokenizer()
    model = build_stage1(str(root / "tower"), tokenizer, SHAPE)
    with torch.no_grad():
        for module in (model.itm_head, model.ln_vision, model.vision_projection, model.text_projection):
            for param in module.parameters():
                param.normal_(0, 0.5)
        model.query_tokens.normal_(0, 0.5)
    run = root / "run1"
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    _image_processor(32).save_pretrained(run)
    return root, model


def _pixels(run_dir, n=2):
    from transformers import AutoImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return images, AutoImageProcessor.from_pretrained(run_dir)(images, return_tensors="pt")["pixel_values"]


def test_stage1_exports_to_retrieval(stage1, tmp_path):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval, BlipProcessor

    root, _ = stage1
    result = export(str(root / "run1"), str(tmp_path / "out"))
    assert result.model_class == "Blip2ForImageTextRetrieval" and not (tmp_path / "out.tmp").exists()
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(processor, BlipProcessor)
    ours = QFormerModel.from_pretrained(root / "run1").eval()
    images, pixels = _pixels(root / "run1")
    text = processor(text=CAPTIONS, padding=True, return_tensors="pt")
    assert torch.equal(processor(images=images, return_tensors="pt")["pixel_values"], pixels)
    with torch.no_grad():
        image_embeds = ours.encode_image(pixels)
        sim = torch.einsum("bqe,te->btq", ours.image_feats(image_embeds),
                           ours.text_feats(text["input_ids"], text["attention_mask"])).amax(dim=-1)
        itc = hf(pixel_values=pixels, **text).logits_per_image
        torch.testing.assert_close(itc, sim, atol=1e-5, rtol=1e-5)
        for i in range(len(images)):  # ITM: each image against every caption
            embeds = image_embeds[i : i + 1].expand(len(CAPTIONS), -1, -1)
            expected = ours.itm_logits(embeds, text["input_ids"], text["attention_mask"]).softmax(dim=-1)
            got = hf(pixel_values=pixels[i : i + 1].expand(len(CAPTIONS), -1, -1, -1), **text,
                     use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected[:, 1].std() > 1e-3  # the test would be weak on a constant ITM head


@pytest.mark.parametrize("family", ["opt-image", "opt", "gpt2", "llama"])
def test_stage2_exports_to_generation(stage1, tmp_path, family):
    """opt-image: the tokenizer has <image>; opt: a spare row takes it; gpt2 / llama: the vocabulary grows."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    root, model = stage1
    tok = _llm_tokenizer() if family == "opt-image" else _plain_llm_tokenizer()
    torch.manual_seed(1)
    _llm(family.removesuffix("-image"), tok).save_pretrained(tmp_path / "llm")
    stage2 = attach_language_model(model, str(tmp_path / "llm"), PROMPT)
    torch.manual_seed(2)  # a visual prompt large enough that the tiny random LLM does not repeat one token
    with torch.no_grad():
        stage2.language_projection.weight.normal_(0, 0.5)
    run = tmp_path / "run2"
    stage2.save_pretrained(run)
    _bert_tokenizer().save_pretrained(run)
    _image_processor(32).save_pretrained(run)
    tok.save_pretrained(run / "llm_tokenizer")

    result = export(str(run), str(tmp_path / "out"))
    assert result.model_class == "Blip2ForConditionalGeneration" and result.prompt == PROMPT
    expected_id = {"opt-image": tok.convert_tokens_to_ids("<image>")}.get(family, len(tok))
    assert result.image_token_index == expected_id
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    grew = family in ("gpt2", "llama")
    assert hf.config.text_config.vocab_size == len(tok) + {"opt-image": 8, "opt": 8}.get(family, 1)
    processor = Blip2Processor.from_pretrained(tmp_path / "out")
    images, pixels = _pixels(run)
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    prompt_ids = tok([PROMPT] * len(images), return_tensors="pt")["input_ids"]
    assert torch.equal(inputs["input_ids"], torch.cat([torch.full((2, 4), expected_id), prompt_ids], dim=1))

    ours = QFormerModel.from_pretrained(run).eval()
    vocab = ours.language_model.config.vocab_size
    with torch.no_grad():
        prefix = ours.language_prefix(ours.encode_image(pixels))
        embeds = torch.cat([prefix, ours.language_model.get_input_embeddings()(prompt_ids)], dim=1)
        expected_logits = ours.language_model(inputs_embeds=embeds).logits[:, -1]
        logits = hf(**inputs).logits[:, -1]
    torch.testing.assert_close(logits[:, :vocab], expected_logits, atol=1e-4, rtol=1e-4)
    if grew:  # the added <image> logit is the mean one, so it never wins a greedy step
        torch.testing.assert_close(logits[:, expected_id], expected_logits.mean(dim=-1), atol=1e-4, rtol=1e-4)

    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1)
    expected = ours.generate(pixels, prompt_ids, **gen)
    got = hf.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(got, expected)
    assert len(set(expected.flatten().tolist())) > 1  # not a degenerate one-token model


def test_refusals(stage1, tmp_path):
    from transformers import ViTConfig, ViTModel

    root, _ = stage1
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, initializer_range=0.02)
    ViTModel(vit).save_pretrained(tmp_path / "vit")
    with pytest.raises(CapfiltError, match="not a capfilt Q-Former model"):
        export(str(tmp_path / "vit"), str(tmp_path / "out"))
    with pytest.raises(CapfiltError, match="no such directory"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "out"))

    tokenizer = _bert_tokenizer()
    build_stage1(str(tmp_path / "vit"), tokenizer, SHAPE).save_pretrained(tmp_path / "vit_run")
    with pytest.raises(CapfiltError, match="only BLIP-2 vision towers") as info:
        export(str(tmp_path / "vit_run"), str(tmp_path / "out"))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()

    mean = dataclasses.replace(SHAPE, text_pooling="mean")
    build_stage1(str(root / "tower"), tokenizer, mean).save_pretrained(tmp_path / "mean_run")
    with pytest.raises(CapfiltError, match="reads \\[CLS\\]"):
        export(str(tmp_path / "mean_run"), str(tmp_path / "out"))

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CapfiltError, match="not empty"):
        export(str(root / "run1"), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    export(str(root / "run1"), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    (tmp_path / "empty").mkdir()  # an empty OUT is fine without --overwrite
    export(str(root / "run1"), str(tmp_path / "empty"))
