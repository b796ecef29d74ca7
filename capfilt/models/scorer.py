"""Filter scorers: a score for every caption of every image, from one of two kinds of filter.

- An image-text matching head (BLIP, BLIP-2, a capfilt Q-Former): P(match). Two raw scores: `itm`, the head's
  logit margin (its own P(match) is the sigmoid of it), and `itc`, the contrastive similarity (BLIP's [CLS]
  features; BLIP-2's best query).
- A CLIP-family dual encoder (CLIP, MetaCLIP 2, SigLIP): the cosine of the image's and the caption's embeddings.
  CLIP's score is that cosine (the DataComp "CLIP score"); SigLIP, trained with a pairwise sigmoid loss, has a
  match probability of its own, sigmoid(exp(logit_scale) * cosine + logit_bias), its raw score the `logit`
  inside. Both equal what the model's own forward gives (`logits_per_image`, its scale and bias).

Each image goes through the vision tower once; its embedding is then shared by all of its captions, so K+1
captions cost one ViT pass and K+1 passes of the (much smaller) text encoder or Q-Former. Captions longer than
the text side reads are cut (special tokens kept, as the tokenizer's own truncation does; DataComp cuts CLIP's at
77 tokens the same way) and counted. With a `Calibration` (`capfilt calibrate`) the score is P(match) =
sigmoid(slope * raw + bias) fitted on held-out human pairs instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoImageProcessor,
    Blip2ForImageTextRetrieval,
    BlipForImageTextRetrieval,
    CLIPModel,
    MetaClip2Model,
    Siglip2Model,
    SiglipModel,
)

from capfilt.errors import CapfiltError
from capfilt.models import losses
from capfilt.models.loading import (
    PixelPreprocess,
    ProcessorPreprocess,
    load_config,
    load_image_transform,
    load_model,
    load_tokenizer,
    stack_pixels,
    vision_dtype,
)
from capfilt.models.qformer import MODEL_TYPE as CAPFILT_QFORMER
from capfilt.models.qformer import QFormerModel
from capfilt.settings import ScorerConfig

logger = logging.getLogger(__name__)

ITM_CLASSES = {"blip": BlipForImageTextRetrieval, "blip-2": Blip2ForImageTextRetrieval,
               CAPFILT_QFORMER: QFormerModel}
# By the config's model_type, as transformers' AutoModel maps it: MetaCLIP (1), LAION's and DFN's CLIPs are "clip";
# the fixed-resolution SigLIP 2 checkpoints are "siglip" (with a Gemma tokenizer), the NaFlex ones "siglip2".
DUAL_ENCODER_CLASSES = {"clip": CLIPModel, "metaclip_2": MetaClip2Model, "siglip": SiglipModel,
                        "siglip2": Siglip2Model}
SCORER_CLASSES = {**ITM_CLASSES, **DUAL_ENCODER_CLASSES}
# SigLIP 2 NaFlex: each image as patches at its own aspect ratio, padded to a fixed count, with their mask and grid.
NAFLEX = "siglip2"
ENC_TOKEN, DEC_TOKEN = "[ENC]", "[DEC]"
RAW_SCORES = ("itm", "itc")  # an ITM filter's
CLIP_RAW, SIGLIP_RAW = ("cosine",), ("logit",)
ALL_RAW_SCORES = RAW_SCORES + CLIP_RAW + SIGLIP_RAW
CALIBRATION_FORMAT = "capfilt-calibration/1"


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow at either end."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Calibration:
    """A filter's P(match) as sigmoid(slope * raw + bias) of one raw score, fitted on held-out pairs where a
    match and a mismatch weigh the same, so that 0.5 is where both are equally likely. Written by `capfilt
    calibrate` (its `auc` and `pairs` say what it was measured on)."""

    score: str  # one of ALL_RAW_SCORES, one its filter has
    slope: float
    bias: float
    filter: str  # the model it was fitted for, as named then
    specs: list[str]  # the shards it was measured on
    clean_text: bool  # whether their captions were cleaned (BLIP's pre_caption), as a run's --clean-text does
    auc: dict[str, float]  # held-out ROC AUC of each raw score measured
    pairs: dict[str, int]  # images, matched and mismatched pairs
    at_half: dict[str, float]  # held out, at P(match) >= 0.5: matched pairs kept, mismatched removed

    def __call__(self, raw: float) -> float:
        return sigmoid(self.slope * raw + self.bias)

    def to_json(self) -> str:
        return json.dumps({"format": CALIBRATION_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def read(cls, path: str) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict) or data.pop("format", None) != CALIBRATION_FORMAT:
                raise ValueError(f"not a {CALIBRATION_FORMAT} file")
            calibration = cls(**data)
            if calibration.score not in ALL_RAW_SCORES or not (math.isfinite(calibration.slope)
                                                           and math.isfinite(calibration.bias)):
                raise ValueError(f"score {calibration.score!r}, slope {calibration.slope}, bias {calibration.bias}")
        except (OSError, ValueError, TypeError) as exc:
            raise CapfiltError(f"--calibration {path!r} is not a calibration written by `capfilt calibrate` "
                               f"({exc})") from None
        return calibration


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


def same_model(a: str, b: str) -> bool:
    """Whether two model names name the same model: equal Hub ids or the same local directory."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def encode(tokenizer, texts: list[str], max_length: int, pad_to_max: bool, mask: bool = True):
    """`texts` tokenized and cut to `max_length` tokens by the tokenizer's own truncation (its special tokens
    kept), padded to the longest or (`pad_to_max`) to `max_length`: (tensors, how many texts were cut). A text
    is cut when its tokens run past `max_length`: tokenizing to one token more tells, without a warning or a
    pass over the whole of a long text's tokens."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length + 1)
    long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)
        for key in encoded.keys():
            for i, row in zip(long, cut[key]):
                encoded[key][i] = row
    tokens = tokenizer.pad(encoded, padding="max_length" if pad_to_max else "longest", max_length=max_length,
                           return_tensors="pt")
    if not mask:
        tokens.pop("attention_mask", None)
    return tokens, len(long)


class Scorer:
    """`scorer(inputs, texts)` -> a score per caption, shaped like `texts`: the filter's own (an ITM head's
    P(match), SigLIP's match probability, CLIP's cosine), or the calibrated P(match) of `config.calibration`.

    `Scorer(config)` builds the kind the checkpoint's config names (`ItmScorer` or `DualEncoderScorer`).
    inputs: one entry per image from `self.preprocess` (see capfilt.data.reader); texts: B lists of captions (any
    lengths).
    """

    cosine = False  # whether the scores are cosine similarities rather than probabilities
    raw_scores: tuple[str, ...] = ()  # the raw scores `raw` gives and a calibration may be fitted on

    def __new__(cls, config: ScorerConfig):
        if cls is Scorer:
            cls = scorer_class(config.model)
        return super().__new__(cls)

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.calibration = Calibration.read(config.calibration) if config.calibration else None  # before the model
        self.model = load_model(config.model, "filter", SCORER_CLASSES, config.device, config.dtype)
        self.tokenizer = load_tokenizer(config.model, "filter")
        self.captions_truncated = 0  # captions cut to max_text_length, over this scorer's calls
        self._last_truncated = 0
        if self.calibration is not None and self.calibration.score not in self.raw_scores:
            raise CapfiltError(f"--calibration {config.calibration} was fitted on the {self.calibration.score!r} "
                               f"score, which filter {config.model!r} does not give (it gives "
                               f"{', '.join(self.raw_scores)}): calibrate this filter")
        if self.calibration is not None and not same_model(self.calibration.filter, config.model):
            logger.warning(f"--calibration {config.calibration} was fitted for {self.calibration.filter!r}, not "
                           f"{config.model!r}: it holds only if that is the same model")

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]]) -> list[list[float]]:
        if self.calibration is None:
            scores = self.own(inputs, texts)
        else:
            scores = [[self.calibration(v) for v in group]
                      for group in self.raw(inputs, texts, self.calibration.score)]
        self.captions_truncated += self._last_truncated  # counted once the batch is scored (an OOM retries it)
        return scores

    def own(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]]) -> list[list[float]]:
        """The filter's own score, uncalibrated."""
        raise NotImplementedError

    def raw(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]], kind: str) -> list[list[float]]:
        """Raw scores of `kind` (one of `raw_scores`), shaped like `texts`."""
        raise NotImplementedError

    def _tokens(self, flat: list[str], pad_to_max: bool = False, mask: bool = True):
        tokens, self._last_truncated = encode(self.tokenizer, flat, self.max_text_length, pad_to_max, mask)
        return tokens.to(self.device)


def scorer_class(name: str) -> type[Scorer]:
    """The scorer for the checkpoint `name`, by its config's model_type (a dual encoder's, else an ITM head's,
    which also refuses what is neither)."""
    model_type = load_config(name, "filter").model_type
    return DualEncoderScorer if model_type in DUAL_ENCODER_CLASSES else ItmScorer


def _split(scores: list[float], texts: list[list[str]]) -> list[list[float]]:
    out, start = [], 0
    for group in texts:
        out.append(scores[start : start + len(group)])
        start += len(group)
    return out


class DualEncoderScorer(Scorer):
    """CLIP, MetaCLIP 2, SigLIP or SigLIP 2: the cosine of each caption's embedding to its image's. SigLIP (the
    model with a `logit_bias`: its pairwise sigmoid loss) scores P(match) = sigmoid(exp(logit_scale) * cosine +
    logit_bias), its raw score the logit; CLIP scores the cosine itself, which is also its raw score. A NaFlex
    SigLIP 2 takes whatever its image processor gives (patches, their mask and grid), collated per key."""

    @property
    def sigmoid_loss(self) -> bool:
        """Trained with SigLIP's pairwise sigmoid loss, whose learnt bias makes its logit a match log-odds."""
        return hasattr(self.model, "logit_bias")

    @property
    def raw_scores(self) -> tuple[str, ...]:
        return SIGLIP_RAW if self.sigmoid_loss else CLIP_RAW

    @property
    def cosine(self) -> bool:
        return not self.sigmoid_loss and self.calibration is None

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        positions = self.model.config.text_config.max_position_embeddings
        self.max_text_length = config.max_text_length or positions
        if self.max_text_length > positions:
            raise CapfiltError(f"filter {config.model!r} reads at most {positions} caption tokens, not "
                               f"{self.max_text_length}")
        # SigLIP was trained on texts padded to its full length and pools the last position: pad to it, as its
        # processor does. The attention mask goes in only where the tokenizer gives one (SigLIP's does not).
        self.pad_to_max = self.sigmoid_loss
        self.mask = "attention_mask" in self.tokenizer.model_input_names
        if self.model.config.model_type == NAFLEX:  # no fixed square: its own processor's patches, as they come
            self.preprocess = ProcessorPreprocess(_image_processor(config.model))
        else:
            self.preprocess = PixelPreprocess(load_image_transform(config.model, self.model.config.vision_config))

    def own(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]]) -> list[list[float]]:
        if not self.sigmoid_loss:
            return self.raw(inputs, texts, "cosine")
        return [[sigmoid(v) for v in group] for group in self.raw(inputs, texts, "logit")]

    @torch.inference_mode()
    def raw(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]], kind: str) -> list[list[float]]:
        if kind not in self.raw_scores:
            raise ValueError(f"unknown raw score {kind!r}: one of {self.raw_scores}")
        flat = [t for group in texts for t in group]
        self._last_truncated = 0
        if not flat:
            return [[] for _ in texts]
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        dtype = vision_dtype(self.model)
        image_inputs = {key: torch.cat([one[key] for one in inputs]) for key in inputs[0]}  # (B, ...) each
        image_inputs = {key: value.to(self.device, dtype if value.is_floating_point() else value.dtype,
                                      non_blocking=True) for key, value in image_inputs.items()}
        image = self.model.get_image_features(**image_inputs).pooler_output  # (B, E)
        tokens = self._tokens(flat, self.pad_to_max, self.mask)
        text = self.model.get_text_features(**tokens).pooler_output  # (T, E)
        # fp32 from here: the cosine and its scale as the model's own forward computes them in fp32.
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        scores = losses.paired_similarities(image.index_select(0, owner)[:, None, :], text)
        if kind == "logit":
            scores = scores * self.model.logit_scale.float().exp() + self.model.logit_bias.float()
        return _split(scores.tolist(), texts)


def _image_processor(name: str):
    try:
        # The PIL processor on every machine: where torchvision is installed, the auto class would pick the
        # torchvision one, whose resizing gives other pixels, and a run resumed elsewhere would write other bytes.
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except (OSError, ValueError, TypeError, ImportError) as exc:
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CapfiltError(f"filter {name!r} has no usable image processor: {first_line}") from None


class ItmScorer(Scorer):
    """BLIP, BLIP-2 or a capfilt Q-Former: the ITM head's P(match) (softmax of its two logits)."""

    raw_scores = RAW_SCORES

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        self.is_capfilt = self.model.config.model_type == CAPFILT_QFORMER
        self.is_blip2 = self.model.config.model_type == "blip-2"
        self.max_text_length = config.max_text_length or (
            self.model.config.max_text_length if self.is_capfilt else 32 if self.is_blip2 else 35)
        self.first_token = None
        if not (self.is_blip2 or self.is_capfilt):
            self.first_token = enc_token_id(self.tokenizer, self.model.config.text_config, config.model)
        self.preprocess = PixelPreprocess(load_image_transform(config.model, self.model.config.vision_config))

    def own(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]]) -> list[list[float]]:
        return self.raw(inputs, texts, "itm", margin=False)

    @torch.inference_mode()
    def raw(self, inputs: list[dict[str, torch.Tensor]], texts: list[list[str]], kind: str, margin: bool = True
            ) -> list[list[float]]:
        """Raw scores of `kind` ("itm": the logit margin, or P(match) with margin=False; "itc": the cosine
        similarity), shaped like `texts`."""
        if kind not in RAW_SCORES:
            raise ValueError(f"unknown raw score {kind!r}: one of {RAW_SCORES}")
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        flat = [t for group in texts for t in group]
        self._last_truncated = 0
        if not flat:
            return [[] for _ in texts]
        pixel_values = stack_pixels(inputs).to(self.device, vision_dtype(self.model), non_blocking=True)
        if self.is_capfilt:
            image_embeds = self.model.encode_image(pixel_values)  # (B, N, D), through its trained LayerNorm
        else:
            # Called as the captioner's generate calls it, so a tower shared with it answers from its last call.
            kwargs = {"return_dict": True} if self.is_blip2 else {}
            image_embeds = self.model.vision_model(pixel_values, **kwargs).last_hidden_state  # (B, N, D)
        tokens = self._tokens(flat)
        if kind == "itc":
            scores = self._itc(image_embeds, tokens, owner)
        else:
            image_embeds = image_embeds.index_select(0, owner)  # (T, N, D): one row per caption, no ViT rerun
            if self.is_capfilt:
                logits = self.model.itm_logits(image_embeds, tokens.input_ids, tokens.attention_mask)
            elif self.is_blip2:
                logits = self._itm_logits_blip2(image_embeds, tokens)
            else:
                logits = self._itm_logits(image_embeds, tokens)
            logits = logits.float()
            scores = logits[:, 1] - logits[:, 0] if margin else logits.softmax(dim=-1)[:, 1]
        return _split(scores.tolist(), texts)

    def _itc(self, image_embeds: torch.Tensor, tokens, owner: torch.Tensor) -> torch.Tensor:
        """The contrastive similarity of each caption to its image, (T,): image and text features from the
        unimodal passes (no cross-attention), L2-normalised; the best of the image's queries for a Q-Former."""
        if self.is_capfilt:
            image_feats = self.model.image_feats(image_embeds)  # (B, Q, E)
            text_feats = self.model.text_feats(tokens.input_ids, tokens.attention_mask)  # (T, E)
        elif self.is_blip2:
            model = self.model
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            queries = model.qformer(query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
                                    encoder_hidden_states=image_embeds.to(model.query_tokens.dtype),
                                    encoder_attention_mask=image_mask).last_hidden_state
            image_feats = F.normalize(model.vision_projection(queries.to(model.vision_projection.weight.dtype))
                                      .float(), dim=-1)
            text = model.qformer(query_embeds=model.embeddings(input_ids=tokens.input_ids), query_length=0,
                                 attention_mask=tokens.attention_mask).last_hidden_state
            text_feats = F.normalize(model.text_projection(text[:, 0, :].to(model.text_projection.weight.dtype))
                                     .float(), dim=-1)
        else:  # BLIP: [CLS] of the image and of the text encoder run without the image
            image_feats = F.normalize(self.model.vision_proj(image_embeds[:, None, 0, :]).float(), dim=-1)  # (B, 1, E)
            text = self.model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            text_feats = F.normalize(self.model.text_proj(text.last_hidden_state[:, 0, :]).float(), dim=-1)
        return losses.paired_similarities(image_feats.index_select(0, owner).float(), text_feats.float())

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
