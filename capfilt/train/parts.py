"""A Q-Former with its tokenizers and image processor: built from parts (stage 1: a vision tower, a BERT-style
tokenizer and optionally a BERT whose weights seed it; stage 2: a stage-1 run and an LLM attached behind a new
projection), loaded and saved as one `from_pretrained` directory, and the tokenisation that turns caption
batches into its inputs. The model itself is `capfilt/models/qformer.py`."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel
from transformers import logging as hf_logging
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig

from capfilt.data.pairs import PairBatch
from capfilt.errors import CapfiltError
from capfilt.models import efficientnet
from capfilt.models.loading import load_config, load_image_transform, load_tokenizer
from capfilt.models.qformer import LLM_TOKENIZER, QFormerConfig, QFormerModel, take_final_norm, vision_class
from capfilt.settings import QFormerShape

# ----------------------------------------------------------------------------------------------- building


def load_vision_tower(name: str) -> PreTrainedModel:
    """A pretrained vision tower by Hub id or local dir (a vision model, or a composite like CLIP / BLIP-2 whose
    `vision_config` is taken), or EfficientNet-Lite0 weights in their original `.pth` layout."""
    if name.endswith(".pth"):
        return efficientnet.load_lukemelas_checkpoint(name)
    config = load_config(name, "vision tower")
    vision_config = getattr(config, "vision_config", None) or config
    cls = vision_class(vision_config)
    if cls is None:
        raise CapfiltError(f"vision tower {name!r} is a {config.model_type!r} checkpoint, not a vision model")
    tower, info = cls.from_pretrained(name, config=vision_config, output_loading_info=True)
    if vision_config is not config and len(info["missing_keys"]) == len(tower.state_dict()):
        # Composites like BLIP-2 keep the tower under `vision_model.` while its own class does not.
        tower = cls.from_pretrained(name, config=vision_config, key_mapping={r"^vision_model\.": ""})
    return tower.eval()


def vision_image_processor(name: str, tower: PreTrainedModel):
    """The preprocessing the tower was trained with, saved into every run directory."""
    if isinstance(tower, efficientnet.EfficientNetLiteModel):
        return efficientnet.image_processor(tower.config)
    return load_image_transform(name, tower.config).processor


def qformer_tokenizer(name: str):
    """A BERT-style tokenizer with BLIP-2's `[DEC]` added as its bos token (ITG's first token)."""
    tokenizer = load_tokenizer(name, "Q-Former tokenizer")
    if tokenizer.bos_token != "[DEC]":
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if tokenizer.cls_token is None or tokenizer.pad_token is None:
        raise CapfiltError(f"Q-Former tokenizer {name!r} needs [CLS] and [PAD] tokens (a BERT-style tokenizer)")
    return tokenizer


def build_stage1(vision: str, tokenizer, shape: QFormerShape) -> QFormerModel:
    """A new stage-1 model: the pretrained tower (its final norm moved into ln_vision), a fresh or BERT-seeded
    Q-Former sized for `tokenizer`."""
    tower = load_vision_tower(vision)
    qformer_config = Blip2QFormerConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, intermediate_size=4 * shape.hidden_size,
        cross_attention_frequency=shape.cross_attention_frequency, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=shape.dropout, attention_probs_dropout_prob=shape.dropout,
        max_position_embeddings=max(512, shape.max_text_length))
    bert = None
    if shape.init_from is not None:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a sentence encoder (MiniLM) has no LM head: its report is expected
        try:
            bert = AutoModelForMaskedLM.from_pretrained(shape.init_from)
        finally:
            hf_logging.set_verbosity(verbosity)
        b = bert.config
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "layer_norm_eps"):
            setattr(qformer_config, key, getattr(b, key))
    config = QFormerConfig(vision_config=tower.config.to_dict(), qformer_config=qformer_config,
                           num_query_tokens=shape.num_query_tokens, embed_dim=shape.embed_dim,
                           max_text_length=shape.max_text_length, decoder_token_id=tokenizer.bos_token_id,
                           initializer_range=shape.initializer_range, text_pooling=shape.text_pooling)
    model = QFormerModel(config)
    norm = take_final_norm(tower)
    model.vision_model.load_state_dict(tower.state_dict())
    if norm is not None:
        model.ln_vision.load_state_dict(norm.state_dict())
    if bert is not None:
        _load_bert(model, bert.state_dict())
    return model


# Q-Former parameter -> BERT (masked-LM) parameter; both feed-forward paths start from BERT's one.
BERT_KEYS = [
    (r"^embeddings\.(word|position)_embeddings\.", r"bert.embeddings.\1_embeddings."),
    (r"^qformer\.layernorm\.", "bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.", r"bert.encoder.layer.\1.attention.self."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.", r"bert.encoder.layer.\1.attention.output."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate(_query)?\.", r"bert.encoder.layer.\1.intermediate."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output(_query)?\.", r"bert.encoder.layer.\1.output."),
    (r"^itg_head\.(dense|LayerNorm)\.", r"cls.predictions.transform.\1."),
    (r"^itg_head\.decoder\.weight$", "bert.embeddings.word_embeddings.weight"),
    (r"^itg_head\.decoder\.bias$", "cls.predictions.bias"),
]


def fresh_parameter(name: str) -> bool:
    """Whether a BERT init leaves this parameter at its random init: everything BERT_KEYS does not map
    (cross-attention, query tokens, ITC projections and temperature, ITM head, ln_vision, the language
    projection), and the LM-head transform and bias: a sentence encoder such as MiniLM ships none (they stay
    random), and a real BERT's merely get the higher lr."""
    if name.startswith("itg_head.") and name != "itg_head.decoder.weight":
        return True
    return not any(re.match(pattern, name) for pattern, _ in BERT_KEYS)


def _load_bert(model: QFormerModel, bert: dict[str, torch.Tensor]) -> None:
    """Copy BERT's weights in; the rows of tokens BERT lacks (`[DEC]`) keep their random init."""
    state = model.state_dict()
    with torch.no_grad():
        for name, param in state.items():
            for pattern, target in BERT_KEYS:
                if re.match(pattern, name):
                    source = bert[re.sub(pattern, target, name)]
                    rows = min(source.shape[0], param.shape[0])
                    param[:rows].copy_(source[:rows])
                    break


def attach_language_model(model: QFormerModel, llm: str, prompt: str) -> QFormerModel:
    """Stage 2 from a stage-1 model: add the frozen causal LLM and a fresh projection to its width."""
    config = load_config(llm, "LLM")
    if AutoModelForCausalLM._model_mapping.get(type(config), None) is None:
        raise CapfiltError(f"LLM {llm!r} is a {config.model_type!r} checkpoint, not a causal language model")
    language_model = AutoModelForCausalLM.from_pretrained(llm)
    config = copy.deepcopy(model.config)  # the stage-1 model stays a stage-1 model
    config.text_config = language_model.config
    config.prompt = prompt
    stage2 = QFormerModel(config)
    weights = {**model.state_dict(), **{f"language_model.{k}": v for k, v in language_model.state_dict().items()}}
    result = stage2.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("language_projection.")]
    if missing or result.unexpected_keys:
        raise CapfiltError(f"LLM {llm!r} does not fit: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    # The new projection writes into the LLM's embedding space: start the visual prompt at the size of a word
    # embedding (the Q-Former's outputs leave a LayerNorm at unit scale). Drawn at the Q-Former's own init
    # instead, a wide from-scratch Q-Former made it ~12x larger, and the frozen LLM answered with gibberish.
    with torch.no_grad():
        word_scale = language_model.get_input_embeddings().weight.float().std().item()
        projection = stage2.language_projection
        projection.weight.normal_(0.0, word_scale / projection.in_features**0.5)
        projection.bias.zero_()
    return stage2


# ----------------------------------------------------------------------------------------------- batches


@dataclass
class Tokenize:
    """PairBatch -> the model's keyword arguments. Stage 1: Q-Former tokens cut at max_text_length and padded
    to the batch's longest caption (every pass of the step is over them: padding to the fixed 32 cost a third
    of the step on COCO captions; the model pads across ranks itself), or to max_text_length with
    `fixed_length` (callers that concatenate batches). Stage 2: LLM tokens `prompt + caption + eos`, loss only
    on the caption and eos. Both carry sample_ids, the key of a cache of frozen image features."""

    stage: int
    tokenizer: object
    max_text_length: int
    llm_tokenizer: object = None
    prompt: str = ""
    fixed_length: bool = False

    def __call__(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        if self.stage == 1:
            tokens = self.tokenizer(batch.captions, padding="max_length" if self.fixed_length else "longest",
                                    truncation=True, max_length=self.max_text_length, return_tensors="pt")
            return dict(pixel_values=batch.pixel_values, input_ids=tokens.input_ids,
                        attention_mask=tokens.attention_mask, sample_ids=batch.sample_ids)
        tok = self.llm_tokenizer
        # The caption follows the prompt after one space, tokenized as one text (LAVIS's way), so a byte-level
        # BPE LLM sees "of Ġa" as in its own training, never a lone-space token ("of Ġ a"); the captioner then
        # prompts with the same stripped text.
        prompt_text = self.prompt.rstrip()
        prompt = tok(prompt_text).input_ids
        rows = []
        for caption in batch.captions:
            ids = tok(f"{prompt_text} {caption}" if prompt_text else caption).input_ids
            if ids[: len(prompt)] != prompt:  # a tokenizer that merges across the space: keep the parts apart
                ids = prompt + tok(caption, add_special_tokens=False).input_ids
            rows.append(ids[: len(prompt) + self.max_text_length] + [tok.eos_token_id])
        length = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(prompt) : len(row)] = ids[i, len(prompt) : len(row)]
        return dict(pixel_values=batch.pixel_values, llm_input_ids=ids, llm_attention_mask=mask, llm_labels=labels,
                    sample_ids=batch.sample_ids)


@dataclass
class Parts:
    model: QFormerModel
    tokenizer: object
    llm_tokenizer: object
    image_processor: object


def build(config, resume_from: Path | None) -> Parts:
    """From `config` (a PretrainConfig), or the checkpoint to resume from."""
    if resume_from is not None:
        return load_parts(str(resume_from))
    if config.stage == 1:
        tokenizer = qformer_tokenizer(config.tokenizer or config.shape.init_from)
        model = build_stage1(config.vision, tokenizer, config.shape)
        return Parts(model, tokenizer, None, vision_image_processor(config.vision, model.vision_model))
    stage1 = load_parts(config.init)
    if stage1.model.has_language_model:
        raise CapfiltError(f"--init {config.init!r} is already a stage-2 model; give a stage-1 run directory")
    model = attach_language_model(stage1.model, config.llm, config.prompt)
    return Parts(model, stage1.tokenizer, load_tokenizer(config.llm, "LLM"), stage1.image_processor)


def load_parts(path: str) -> Parts:
    from transformers import AutoImageProcessor

    if not (Path(path) / "config.json").is_file():
        raise CapfiltError(f"{path!r} holds no finished model (no config.json)")
    model = QFormerModel.from_pretrained(path)
    llm_tokenizer = load_tokenizer(path, "LLM", subfolder=LLM_TOKENIZER) if model.has_language_model else None
    return Parts(model, load_tokenizer(path, "Q-Former"), llm_tokenizer, AutoImageProcessor.from_pretrained(path))


def save_parts(parts: Parts, model: QFormerModel, path: Path) -> None:
    """A complete `from_pretrained` directory: model, tokenizers, image processor."""
    model.save_pretrained(path)
    parts.tokenizer.save_pretrained(path)
    parts.image_processor.save_pretrained(path)
    if parts.llm_tokenizer is not None:
        parts.llm_tokenizer.save_pretrained(path / LLM_TOKENIZER)
