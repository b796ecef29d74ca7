"""Captioner: an image-grounded text decoder (BLIP, BLIP-2, InstructBLIP or a capfilt Q-Former) that writes
synthetic captions for a batch of images; `load_captioner` also takes any image-text-to-text VLM
(`capfilt.models.vlm`).

Defaults are BLIP's CapFilt settings (salesforce/BLIP `generate`): the model's own prompt (BLIP's "a picture
of ") removed from the output, nucleus sampling with top_p 0.9, top_k 50 and repetition penalty 1.1, lengths
10..30 tokens counted with the prompt. Beam search uses 3 beams and no repetition penalty.
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
    InstructBlipForConditionalGeneration,
)

from capfilt.errors import CapfiltError
from capfilt.models import vlm
from capfilt.models.loading import (
    PixelPreprocess,
    load_config,
    load_image_transform,
    load_model,
    load_tokenizer,
    stack_pixels,
    vision_dtype,
)
from capfilt.models.qformer import LLM_TOKENIZER, QFormerModel
from capfilt.models.qformer import MODEL_TYPE as CAPFILT_QFORMER
from capfilt.settings import CaptionerConfig

CAPTIONER_CLASSES = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration,
                     "instructblip": InstructBlipForConditionalGeneration, CAPFILT_QFORMER: QFormerModel}
# Each kind's own captioning prompt: BLIP's CapFilt, LAVIS's BLIP-2 captioning, InstructBLIP's short-caption
# instruction. An LLM's prompt never ends in a space: a byte-level BPE tokenizer would make it a lone-space token,
# which its LLM never saw before a word.
PROMPTS = {"blip": "a picture of ", "blip-2": "a photo of", "instructblip": "A short image caption:"}
# What else a captioner may be, for the one line an unusable checkpoint gets.
VLMS = ("an image-text-to-text VLM (Qwen2-VL and Qwen2.5-VL, SmolVLM / Idefics3, LLaVA, PaliGemma, Florence-2, "
        "...) such as Qwen/Qwen2-VL-2B-Instruct",)


def load_captioner(config: CaptionerConfig):
    """The captioner `config.model` is: a BLIP-family `Captioner`, or a `VlmCaptioner` for any other model type
    transformers' image-text-to-text auto class loads (decided from its config, as transformers decides)."""
    model_config = load_config(config.model, "captioner")
    if model_config.model_type not in CAPTIONER_CLASSES and vlm.is_vlm(model_config):
        return vlm.VlmCaptioner(config)
    return Captioner(config)


class Captioner:
    """`captioner(inputs, seed)` -> for each image, `num_captions` synthetic captions (prompt removed).

    inputs: one entry per image from `self.preprocess` (see capfilt.data.reader). Built once at the entry
    point; touches no paths.
    """

    # Settings this captioner does not read (kept out of an output's recorded settings, so resumes match).
    unused_settings = ("max_new_tokens",)

    def __init__(self, config: CaptionerConfig):
        self.config = config
        self.model = load_model(config.model, "captioner", CAPTIONER_CLASSES, config.device, config.dtype, VLMS)
        self.kind = self.model.config.model_type
        self.is_capfilt = self.kind == CAPFILT_QFORMER
        self.uses_llm = not self.is_capfilt or self.model.has_language_model  # else a stage-1 Q-Former's ITG decoder
        self.tokenizer = load_tokenizer(config.model, "captioner",
                                        subfolder=LLM_TOKENIZER if self.is_capfilt and self.uses_llm else "")
        if not self.uses_llm and config.sampling == "beam":
            raise CapfiltError(f"captioner {config.model!r} is a stage-1 Q-Former: it captions with nucleus or greedy")
        self.preprocess = PixelPreprocess(load_image_transform(config.model, self.model.config.vision_config))
        # capfilt models caption after the prompt they were trained with (stage 1's ITG decoder: none).
        own = (self.model.config.prompt if self.uses_llm else "") if self.is_capfilt else PROMPTS[self.kind]
        self.prompt = own if config.prompt is None else config.prompt
        if self.uses_llm and self.kind != "blip":  # BLIP's WordPiece ignores the space; an LLM's BPE would not
            self.prompt = self.prompt.rstrip()
        self.prefix = self._prompt_prefix()
        text_config = getattr(self.model.config, "text_config", None)
        self.encoder_decoder = self.kind != "blip" and bool(getattr(text_config, "is_encoder_decoder", False))
        self.instruction = None  # InstructBLIP: the prompt in the Q-Former's own tokens, which it reads too
        if self.kind == "instructblip":
            qformer_tokenizer = load_tokenizer(config.model, "captioner", "qformer_tokenizer")
            self.instruction = list(qformer_tokenizer(self.prompt).input_ids)
        self.eos_token_ids = None  # an LLM's captions end at its generation config's end or its tokenizer's
        if self.kind in ("blip-2", "instructblip"):
            self.eos_token_ids = vlm.end_of_text_ids(self.model.generation_config, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _prompt_prefix(self) -> list[int]:
        """Token ids that precede generation. BLIP: `[DEC]` then the prompt (HF's generate swaps in `[DEC]` for
        `[CLS]` and drops the final `[SEP]`); a stage-1 capfilt model likewise. BLIP-2 and InstructBLIP: the
        prompt as its LLM's tokenizer encodes it, as their processors do; the query placeholders go in front at
        call time."""
        ids = self.tokenizer(self.prompt).input_ids
        if self.is_capfilt:
            return list(ids) if self.uses_llm else [self.model.config.decoder_token_id] + list(ids[1:-1])
        if self.kind in ("blip-2", "instructblip"):
            image_token = getattr(self.model.config, "image_token_index", None)
            if image_token is None:
                raise CapfiltError(f"captioner {self.config.model!r}: its config.json lacks image_token_index "
                                   "(the id of the <image> token), which transformers 5 needs")
            rows = self.model.get_input_embeddings().num_embeddings
            if not 0 <= image_token < rows:
                raise CapfiltError(f"captioner {self.config.model!r}: image_token_index {image_token} has no row "
                                   f"in its LLM's {rows} embeddings: use the checkpoint's current Hub revision")
            return list(ids)
        return [self.model.config.text_config.bos_token_id] + list(ids[1:-1])

    @torch.inference_mode()
    def __call__(self, inputs: list[dict[str, torch.Tensor]], seed: int | None = None) -> list[list[str]]:
        pixel_values = stack_pixels(inputs)
        batch = pixel_values.shape[0]
        pixel_values = pixel_values.to(self.device, vision_dtype(self.model), non_blocking=True)
        if seed is not None:
            torch.manual_seed(seed)
        prefix = torch.tensor([self.prefix], device=self.device).repeat(batch, 1)
        # The lengths count the prompt where the output holds it; an encoder-decoder LLM's output never does.
        kwargs = self.config.generation_kwargs(prompt_tokens=0 if self.encoder_decoder else len(self.prefix))
        if self.is_capfilt:  # the queries go in as embeddings; only new tokens come back
            if not self.uses_llm:  # the ITG decoder ends a caption with [SEP]
                kwargs.update(eos_token_id=self.tokenizer.sep_token_id, pad_token_id=self.tokenizer.pad_token_id)
            out = self.model.generate(pixel_values, input_ids=prefix, **kwargs)
        elif self.kind in ("blip-2", "instructblip"):
            queries = self.model.config.num_query_tokens
            image_tokens = torch.full((batch, queries), self.model.config.image_token_index, device=self.device)
            input_ids = torch.cat([image_tokens, prefix], dim=1)
            kwargs["eos_token_id"] = self.eos_token_ids
            if self.instruction is not None:
                kwargs["qformer_input_ids"] = torch.tensor([self.instruction], device=self.device).repeat(batch, 1)
            out = self.model.generate(pixel_values, input_ids=input_ids, **kwargs)
            # Decoder-only LLMs echo the input ids; encoder-decoder ones (Flan-T5) return only new tokens.
            if not self.encoder_decoder:
                out = out[:, input_ids.shape[1] :]
        else:
            # HF BLIP's generate replaces position 0 with [DEC] and drops the last position (the [SEP]).
            input_ids = torch.cat([prefix, prefix[:, :1]], dim=1)
            out = self.model.generate(pixel_values, input_ids=input_ids, **kwargs)[:, len(self.prefix) :]
        # A caption is one line: a chat-tuned LLM behind a visual prompt may run on past it ("...\nA: 3.9/5").
        texts = [t.strip().split("\n")[0].strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        k = self.config.num_captions
        return [texts[i * k : (i + 1) * k] for i in range(batch)]
