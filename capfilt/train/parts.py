"""A Q-Former with its tokenizers and image processor: built from parts (stage 1: a vision tower and a BERT-style
tokenizer; stage 2: a stage-1 run and an LLM), loaded and saved as one `from_pretrained` directory, and the
tokenisation that turns caption batches into its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from capfilt.data.pairs import PairBatch
from capfilt.errors import CapfiltError
from capfilt.models.loading import load_tokenizer
from capfilt.models.qformer import (
    LLM_TOKENIZER,
    QFormerModel,
    attach_language_model,
    build_stage1,
    qformer_tokenizer,
    vision_image_processor,
)


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
