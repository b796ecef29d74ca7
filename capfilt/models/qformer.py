"""capfilt's BLIP-2 model: a frozen image encoder, a Q-Former trained with ITC + ITM + ITG (stage 1), and,
from stage 2 on, a frozen causal LLM behind one linear projection.

The Q-Former is transformers' own `Blip2QFormerModel` (with its text path) and the parameter names follow
`Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration`, so a model on a BLIP-2 vision tower exports
to plain transformers by renaming one LayerNorm (`capfilt export`). What transformers lacks, the stage-1
losses and their masks, lives in `capfilt/models/losses.py`.

The image encoder can be any Hugging Face vision tower (CLIP, SigLIP, ViT, DINOv2, BLIP / BLIP-2 vision) or
EfficientNet-Lite0. Its final LayerNorm, when it has one, is moved out of the frozen tower into the trainable
`ln_vision` (BLIP-2's "trainable LayerNorm on the frozen ViT"), starting from the pretrained values.

The config and the model read top to bottom here, as transformers keeps one file per model; building one from
parts (a pretrained tower, a BERT init, attaching an LLM) lives in `capfilt/train/parts.py`, as transformers
keeps its conversion scripts apart from its modeling files.

A saved model is one `from_pretrained` directory holding all of it, frozen parts included, so a run
directory serves as `--captioner` and `--filter` as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings, Blip2VisionModel

from capfilt.errors import CapfiltError
from capfilt.models import (
    efficientnet,  # noqa: F401  importing it registers it with AutoConfig / AutoModel
    losses,
)

MODEL_TYPE = "capfilt-qformer"
LLM_TOKENIZER = "llm_tokenizer"  # a stage-2 model's LLM tokenizer, beside the Q-Former's at the root
FINAL_NORMS = ("post_layernorm", "vision_model.post_layernorm", "layernorm")
# Vision towers AutoModel does not map (they normally live inside their composite model).
UNMAPPED_TOWERS = {"blip_2_vision_model": Blip2VisionModel, "blip_vision_model": BlipVisionModel}
TEXT_FFN = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")  # the text-only feed-forward blocks


@strict
class QFormerConfig(PreTrainedConfig):
    """vision_config: the frozen tower's config (any AutoConfig vision model); qformer_config: the Q-Former
    (`encoder_hidden_size` follows the tower); text_config: the frozen LLM's, from stage 2 on."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_vision_model"),
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection width
    max_text_length: int = 32
    prompt: str = ""  # the LLM prompt stage 2 trained behind the queries
    decoder_token_id: int | None = None  # [DEC], which replaces [CLS] for ITG
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True  # the ITG head's decoder is the word embedding matrix
    text_pooling: str = "cls"  # ITC text feature: "cls" (BLIP-2) or "mean" over the caption's tokens

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.qformer_config.use_qformer_text_input = True  # ITC/ITM/ITG run text through the Q-Former
        if self.num_query_tokens < 1 or self.embed_dim < 1 or self.max_text_length < 2:
            raise ValueError("num_query_tokens and embed_dim must be >= 1 and max_text_length >= 2")
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")


@dataclass
class QFormerOutput(ModelOutput):
    """Scalar losses of one training step. Stage 1 fills itc, itm and itg (loss = their unweighted sum);
    stage 2 fills lm (loss = lm)."""

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_itg: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None


class ITGHead(nn.Module):
    """BERT's LM head (transform, then vocabulary projection, its weight tied to the word embeddings) for the
    image-grounded text generation."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(hidden))))


def vision_class(config: PreTrainedConfig) -> type[PreTrainedModel] | None:
    return UNMAPPED_TOWERS.get(config.model_type) or AutoModel._model_mapping.get(type(config), None)


def take_final_norm(tower: nn.Module) -> nn.LayerNorm | None:
    """Remove the tower's final LayerNorm (replaced by Identity) and return it; None if it has none."""
    for path in FINAL_NORMS:
        try:
            norm = tower.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(norm, nn.LayerNorm):
            tower.set_submodule(path, nn.Identity())
            return norm
    return None


class QFormerModel(PreTrainedModel):
    config_class = QFormerConfig
    base_model_prefix = "qformer_model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    # ITG predicts words with the word embeddings themselves, as BERT's LM head and LAVIS's Q-Former do.
    _tied_weights_keys = {"itg_head.decoder.weight": "embeddings.word_embeddings.weight"}

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        qcfg = config.qformer_config
        self.vision_model = vision_class(config.vision_config)._from_config(config.vision_config)
        norm = take_final_norm(self.vision_model)
        width = config.vision_config.hidden_size
        self.ln_vision = nn.LayerNorm(width, eps=norm.eps if norm is not None else 1e-6)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qcfg)
        self.qformer = Blip2QFormerModel(qcfg)
        self.vision_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.itg_head = ITGHead(qcfg)
        self.temp = nn.Parameter(torch.tensor(0.07))
        if config.text_config is not None:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
            self.language_projection = nn.Linear(qcfg.hidden_size, config.text_config.hidden_size)
        self.post_init()
        self.freeze(stage=2 if config.text_config is not None else 1)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, QFormerModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)
            init.constant_(module.temp, 0.07)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze(stage=2 if model.has_language_model else 1)  # loading builds fresh, trainable parameters
        return loaded

    @property
    def has_language_model(self) -> bool:
        return self.config.text_config is not None

    def freeze(self, stage: int) -> None:
        """Frozen: the image encoder and the LLM, always. Stage 2 trains only what its loss reaches (queries,
        ln_vision, the Q-Former's query path, the projection), which also keeps DDP free of unused parameters."""
        for name, param in self.named_parameters():
            if name.startswith(("vision_model.", "language_model.")):
                param.requires_grad_(False)
            elif stage == 2:
                on_path = name.startswith(("query_tokens", "ln_vision.", "qformer.", "language_projection."))
                param.requires_grad_(on_path and not TEXT_FFN.search(name))
            else:
                param.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()  # frozen parts stay in eval mode: no dropout, batch-norm statistics fixed
        if self.has_language_model:
            self.language_model.eval()
        return self

    # ------------------------------------------------------------------------------------------- features

    @torch.no_grad()
    def frozen_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) the frozen tower's tokens, before the trainable LayerNorm. Without
        augmentation they are a function of the image alone, so a trainer may compute them once per image."""
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """(B, 3, H, W) pixels, or (B, N, D) `frozen_tokens` already computed -> (B, N, D) through the
        trainable LayerNorm."""
        tokens = self.frozen_tokens(pixel_values) if image_tokens is None else image_tokens
        return self.ln_vision(tokens.to(self.ln_vision.weight.dtype))

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Queries alone (they see only each other) cross-attending to the image: (B, N, D) -> (B, Q, H)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone (it sees only text, no image): (B, T) -> (B, T, H)."""
        embeds = self.embeddings(input_ids=input_ids)
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC image features, one per query, L2-normalised: (B, Q, E)."""
        return F.normalize(self.vision_projection(self.query_outputs(image_embeds)), dim=-1)

    def text_feats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text feature from the `[CLS]` position (or the mean of the real tokens, `text_pooling`),
        L2-normalised: (B, E)."""
        hidden = self.text_outputs(input_ids, attention_mask)
        if self.config.text_pooling == "mean":
            mask = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def _joint(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Queries and text in one pass; `attention_mask` is (B, T) padding (bidirectional) or a 4-D additive
        mask over the Q+T positions. -> (B, Q+T, H)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        if attention_mask.dim() == 2:
            attention_mask = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(-1, queries.shape[1]),
                                        attention_mask], dim=1)
        return self.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=attention_mask,
                            encoder_hidden_states=image_embeds).last_hidden_state

    def itm_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Match / no-match logits, the ITM head averaged over the query outputs: (B, 2)."""
        hidden = self._joint(image_embeds, input_ids, attention_mask)[:, : self.config.num_query_tokens]
        return self.itm_head(hidden).mean(dim=1)

    def itg_hidden(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Text positions' outputs under the multimodal causal mask: (B, T, H). input_ids start with `[DEC]`."""
        mask = losses.itg_mask(self.config.num_query_tokens, attention_mask, self.query_tokens.dtype)
        return self._joint(image_embeds, input_ids, mask)[:, self.config.num_query_tokens :]

    def itg_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Next-token logits at the text positions under the multimodal causal mask: (B, T, V). input_ids must
        start with `[DEC]`."""
        return self.itg_head(self.itg_hidden(image_embeds, input_ids, attention_mask))

    def itg_loss(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """`losses.itg_loss` of `itg_logits`, with the vocabulary projection run only at the positions that
        have a target: with a 30k-word vocabulary that projection is most of ITG's cost, and padding and the
        last token (no next token) are a third or more of the positions."""
        hidden = self.itg_hidden(image_embeds, input_ids, attention_mask)
        scored = attention_mask[:, 1:] != 0
        logits = self.itg_head(hidden[:, :-1][scored])  # (targets, V)
        total = F.cross_entropy(logits.float(), input_ids[:, 1:][scored], label_smoothing=losses.LABEL_SMOOTHING,
                                reduction="sum")
        return total / losses.tokens_per_rank(input_ids[:, 1:].masked_fill(~scored, losses.IGNORE))

    def language_prefix(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The soft visual prompt: query outputs projected to the LLM's width, (B, Q, D_llm)."""
        prefix = self.language_projection(self.query_outputs(image_embeds))
        return prefix.to(self.language_model.get_input_embeddings().weight.dtype)

    # ------------------------------------------------------------------------------------------- training

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, sample_ids=None, negatives_seed: int = 0,
                llm_input_ids=None, llm_attention_mask=None, llm_labels=None, image_tokens=None) -> QFormerOutput:
        """Stage 1 when `llm_labels` is None (input_ids / attention_mask: (B, T) Q-Former tokens starting with
        `[CLS]`, padded to any length; sample_ids: (B,) equal for copies of one image; negatives_seed fixes the
        hard-negative draw), stage 2 otherwise (llm_*: (B, L) LLM tokens, labels -100 on prompt and padding).
        image_tokens: the frozen tower's output for pixel_values (`frozen_tokens`), when the caller has it."""
        image_embeds = self.encode_image(pixel_values, image_tokens)
        if llm_labels is not None:
            return self._stage2(image_embeds, llm_input_ids, llm_attention_mask, llm_labels)
        if sample_ids is None:
            batch = input_ids.shape[0]
            sample_ids = torch.arange(batch, device=input_ids.device) + losses.row_offset(batch)
        # Ranks pad to their own longest caption; the hard-negative texts are gathered, so shapes must agree.
        input_ids, attention_mask = losses.pad_to_global_length(input_ids, attention_mask,
                                                                self.config.qformer_config.pad_token_id or 0)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        loss_itc, sim_i2t, sim_t2i = losses.itc_loss(
            self.image_feats(image_embeds), self.text_feats(input_ids, attention_mask), self.temp)

        batch = input_ids.shape[0]
        neg_text, neg_image = losses.itm_pairs(sim_i2t, sim_t2i, sample_ids, negatives_seed)
        all_images = losses.gather(image_embeds)
        all_ids = losses.gather(input_ids, grad=False)
        all_mask = losses.gather(attention_mask, grad=False)
        pair_images = torch.cat([image_embeds, all_images[neg_image], image_embeds])
        pair_ids = torch.cat([input_ids, input_ids, all_ids[neg_text]])
        pair_mask = torch.cat([attention_mask, attention_mask, all_mask[neg_text]])
        logits = self.itm_logits(pair_images, pair_ids, pair_mask)
        loss_itm = F.cross_entropy(logits.float(), losses.itm_labels(batch, logits.device))

        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.config.decoder_token_id
        loss_itg = self.itg_loss(image_embeds, dec_ids, attention_mask)
        return QFormerOutput(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm,
                             loss_itg=loss_itg)

    def _stage2(self, image_embeds, llm_input_ids, llm_attention_mask, llm_labels) -> QFormerOutput:
        prefix = self.language_prefix(image_embeds)
        embeds = torch.cat([prefix, self.language_model.get_input_embeddings()(llm_input_ids)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=llm_attention_mask.dtype, device=prefix.device)
        ignore = torch.full(prefix.shape[:2], losses.IGNORE, dtype=llm_labels.dtype, device=prefix.device)
        labels = torch.cat([ignore, llm_labels], dim=1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=torch.cat([ones, llm_attention_mask], dim=1),
                                  labels=labels, num_items_in_batch=losses.tokens_per_rank(labels[:, 1:]))
        return QFormerOutput(loss=out.loss, loss_lm=out.loss)

    # ------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        """Captions: a stage-2 model's from the LLM behind the visual prompt (input_ids: (B, P) the prompt in the
        LLM's tokens), a stage-1 model's from its ITG decoder (input_ids: (B, P) `[DEC]` then the prompt in the
        Q-Former's tokens; `eos_token_id` is `[SEP]`). Returns only the new tokens, (B * num_return_sequences, L)."""
        if not self.has_language_model:
            return self._itg_generate(pixel_values, input_ids, **kwargs)
        prefix = self.language_prefix(self.encode_image(pixel_values))
        embeds = torch.cat([prefix, self.language_model.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if attention_mask is not None:
            mask[:, prefix.shape[1] :] = attention_mask
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def _itg_generate(self, pixel_values, input_ids, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                      min_new_tokens: int = 0, do_sample: bool = False, top_p: float = 1.0, top_k: int = 0,
                      repetition_penalty: float = 1.0, num_beams: int = 1, num_return_sequences: int = 1):
        """BLIP's captioner: the image-grounded decoder (ITG mask) sampled token by token. The Q-Former has no KV
        cache, so each step re-runs the prefix: fine for captions of up to ~30 tokens."""
        if num_beams > 1:
            raise CapfiltError("a stage-1 Q-Former captions with nucleus sampling or greedy decoding, not beam search")
        processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(input_ids.shape[1], min_new_tokens,
                                                                            eos_token_id, device=input_ids.device)])
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if do_sample and top_k:
            processors.append(TopKLogitsWarper(top_k))
        if do_sample and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        image_embeds = self.encode_image(pixel_values).repeat_interleave(num_return_sequences, dim=0)
        ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self.itg_logits(image_embeds, ids, torch.ones_like(ids))[:, -1].float()
            scores = processors(ids, logits)
            token = torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)
            token = token.masked_fill(done, pad_token_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == eos_token_id
            if done.all():
                break
        return ids[:, input_ids.shape[1] :]


AutoConfig.register(MODEL_TYPE, QFormerConfig)
AutoModel.register(QFormerConfig, QFormerModel)
