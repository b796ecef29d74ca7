"""Filter scorer: P(match) from an image-text matching head (BLIP or BLIP-2) for every caption of every image.

Each image goes through the vision tower once; its embedding is then shared by all of its captions, so K+1
captions cost one ViT pass and K+1 passes of the (much smaller) text encoder or Q-Former.
"""

from __future__ import annotations

import torch
from transformers import Blip2ForImageTextRetrieval, BlipForImageTextRetrieval

from capfilt.errors import CapfiltError
from capfilt.models.loading import ImageTransform, load_image_transform, load_model, load_tokenizer, vision_dtype
from capfilt.models.qformer import MODEL_TYPE as CAPFILT_QFORMER
from capfilt.models.qformer import QFormerModel
from capfilt.settings import ScorerConfig

SCORER_CLASSES = {"blip": BlipForImageTextRetrieval, "blip-2": Blip2ForImageTextRetrieval,
                  CAPFILT_QFORMER: QFormerModel}
ENC_TOKEN, DEC_TOKEN = "[ENC]", "[DEC]"


def enc_token_id(tokenizer, text_config, name: str = "") -> int:
    """The id of BLIP's `[ENC]` token. BLIP's tokenizer is bert-base-uncased plus `[DEC]` (bos) and `[ENC]`, in
    that order (ids 30522 and 30523); the Hub's BLIP tokenizers ship plain bert-base-uncased, without either,
    while the embedding matrix keeps both rows: `[DEC]` is the config's bos id and `[ENC]` the row after it."""
    token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return token_id
    dec = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if dec is None or dec == tokenizer.unk_token_id:
        dec = text_config.bos_token_id
    # The row after [DEC] must be one no tokenizer text can produce, and must exist.
    if dec is not None and len(tokenizer) <= dec + 1 < text_config.vocab_size:
        return dec + 1
    raise CapfiltError(
        f"filter {name!r}: its tokenizer ({len(tokenizer)} tokens) has no {ENC_TOKEN} token, and its text embeddings "
        f"({text_config.vocab_size} rows, [DEC] = {dec}) have no row for one after [DEC], as BLIP's ITM models do"
    )


class Scorer:
    """`scorer(pixel_values, texts)` -> P(match) per caption, shaped like `texts`.

    pixel_values: (B, 3, H, W) from `self.image_transform`; texts: B lists of captions (any lengths).
    """

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.model = load_model(config.model, "filter", SCORER_CLASSES, config.device, config.dtype)
        self.tokenizer = load_tokenizer(config.model, "filter")
        self.is_capfilt = self.model.config.model_type == CAPFILT_QFORMER
        self.is_blip2 = self.model.config.model_type == "blip-2"
        self.max_text_length = config.max_text_length or (
            self.model.config.max_text_length if self.is_capfilt else 32 if self.is_blip2 else 35)
        self.first_token = None
        if not (self.is_blip2 or self.is_capfilt):
            self.first_token = enc_token_id(self.tokenizer, self.model.config.text_config, config.model)
        self.image_transform: ImageTransform = load_image_transform(config.model, self.model.config.vision_config)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, texts: list[list[str]]) -> list[list[float]]:
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        flat = [t for group in texts for t in group]
        if not flat:
            return [[] for _ in texts]
        pixel_values = pixel_values.to(self.device, vision_dtype(self.model), non_blocking=True)
        if self.is_capfilt:
            image_embeds = self.model.encode_image(pixel_values)  # (B, N, D), through its trained LayerNorm
        else:
            # Called as the captioner's generate calls it, so a tower shared with it answers from its last call.
            kwargs = {"return_dict": True} if self.is_blip2 else {}
            image_embeds = self.model.vision_model(pixel_values, **kwargs).last_hidden_state  # (B, N, D)
        image_embeds = image_embeds.index_select(0, owner)  # (T, N, D): one row per caption, no ViT rerun
        tokens = self.tokenizer(
            flat, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        if self.is_capfilt:
            logits = self.model.itm_logits(image_embeds, tokens.input_ids, tokens.attention_mask)
        elif self.is_blip2:
            logits = self._itm_logits_blip2(image_embeds, tokens)
        else:
            logits = self._itm_logits(image_embeds, tokens)
        scores = logits.float().softmax(dim=-1)[:, 1].tolist()
        out, start = [], 0
        for group in texts:
            out.append(scores[start : start + len(group)])
            start += len(group)
        return out

    def _itm_logits(self, image_embeds: torch.Tensor, tokens) -> torch.Tensor:
        """BLIP: the text encoder cross-attends to the image; its first token, `[ENC]` as in BLIP's ITM
        training (HF's own forward leaves `[CLS]` there, transformers #25629), feeds the ITM head. (T, 2)."""
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = self.first_token
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.model.itm_head(hidden[:, 0, :])

    def _itm_logits_blip2(self, image_embeds: torch.Tensor, tokens) -> torch.Tensor:
        """BLIP-2: queries and text share self-attention with a bidirectional mask; the queries cross-attend to
        the image; the ITM logit is the head's output averaged over the query positions. (T, 2)."""
        model = self.model
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        num_queries = queries.shape[1]
        embeds = model.embeddings(input_ids=tokens.input_ids, query_embeds=queries)
        query_mask = torch.ones(queries.shape[:-1], dtype=tokens.attention_mask.dtype, device=self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = model.qformer(
            query_embeds=embeds,
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, tokens.attention_mask], dim=1),
            encoder_hidden_states=image_embeds.to(queries.dtype),
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return model.itm_head(hidden[:, :num_queries, :].to(model.itm_head.weight.dtype)).mean(dim=1)
