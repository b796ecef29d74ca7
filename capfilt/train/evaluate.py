"""`capfilt eval`: zero-shot image-text retrieval (ITC, optionally re-ranked by ITM) and caption loss of a
pre-trained Q-Former on held-out shards.

Retrieval pairs every image with its own caption. A retrieved caption counts as correct when it is the same
text as the image's own one (and a retrieved image when its caption is the query): duplicate captions are
common in web corpora and in the synthetic world, and an exact-index rule would mark a right answer wrong.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from capfilt.data.pairs import PairBatch, PairStream, load_pairs
from capfilt.data.reader import expand_specs
from capfilt.models import losses
from capfilt.models.loading import ImageTransform, resolve_device
from capfilt.models.qformer import QFormerModel
from capfilt.settings import EvalConfig

RECALL_AT = (1, 5, 10)


@dataclass
class EvalReport:
    """Recalls in [0, 1] keyed by k; itm_* only with re-ranking; lm_loss only for stage-2 models."""

    samples: int
    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    itg_loss: float
    itm_image_to_text: dict[int, float] = field(default_factory=dict)
    itm_text_to_image: dict[int, float] = field(default_factory=dict)
    lm_loss: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def recalls(r):
            return "  ".join(f"R@{k} {100 * v:5.1f}" for k, v in r.items())
        lines = [f"samples            {self.samples:,}",
                 f"image -> text ITC  {recalls(self.image_to_text)}",
                 f"text -> image ITC  {recalls(self.text_to_image)}"]
        if self.itm_image_to_text:
            lines += [f"image -> text ITM  {recalls(self.itm_image_to_text)}",
                      f"text -> image ITM  {recalls(self.itm_text_to_image)}"]
        lines.append(f"ITG caption loss   {self.itg_loss:.4f}")
        if self.lm_loss is not None:
            lines.append(f"LLM caption loss   {self.lm_loss:.4f}")
        if self.skipped:
            lines.append("skipped            " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)


def recall(scores: torch.Tensor, correct: torch.Tensor) -> dict[int, float]:
    """scores: (Nq, Nc); correct: (Nq, Nc) bool. Share of queries with a correct candidate in their top k."""
    top = scores.topk(min(max(RECALL_AT), scores.shape[1]), dim=1).indices
    hits = correct.gather(1, top)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in RECALL_AT}


@torch.no_grad()
def evaluate(model: QFormerModel, tokenize_stage1, batches: Iterable[PairBatch], tokenize_stage2=None,
             rerank_k: int = 0) -> EvalReport:
    """`tokenize_stage1` / `tokenize_stage2`: `pretrain.Tokenize` callables (PairBatch -> model inputs)."""
    model.eval()
    device = model.device
    image_feats, text_feats, image_embeds, tokens, captions = [], [], [], [], []
    itg, lm, count, skipped = 0.0, 0.0, 0, Counter()
    for batch in batches:
        skipped.update(batch.skipped)
        if not batch.captions:
            continue
        inputs = {k: v.to(device) for k, v in tokenize_stage1(batch).items()}
        embeds = model.encode_image(inputs["pixel_values"])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image_feats.append(model.image_feats(embeds).float().cpu())
        text_feats.append(model.text_feats(ids, mask).float().cpu())
        dec = ids.clone()
        dec[:, 0] = model.config.decoder_token_id
        n = len(batch.captions)
        itg += losses.itg_loss(model.itg_logits(embeds, dec, mask), dec, mask).item() * n
        if tokenize_stage2 is not None:
            llm = {k: v.to(device) for k, v in tokenize_stage2(batch).items() if k != "pixel_values"}
            lm += model(inputs["pixel_values"], **llm).loss.item() * n
        if rerank_k:
            image_embeds.append(embeds.cpu())
            tokens.append((ids.cpu(), mask.cpu()))
        captions += batch.captions
        count += n
    if count == 0:
        return EvalReport(0, {}, {}, float("nan"), skipped=dict(skipped))
    sims = losses.similarities(torch.cat(image_feats), torch.cat(text_feats))  # (N images, N texts)
    same = _same_caption(captions)
    report = EvalReport(count, recall(sims, same), recall(sims.t(), same.t()), itg / count,
                        lm_loss=lm / count if tokenize_stage2 is not None else None, skipped=dict(skipped))
    if rerank_k:
        embeds = torch.cat(image_embeds)
        ids = torch.cat([t[0] for t in tokens])
        mask = torch.cat([t[1] for t in tokens])
        report.itm_image_to_text = recall(_rerank(model, sims, embeds, ids, mask, rerank_k, images_first=True), same)
        report.itm_text_to_image = recall(_rerank(model, sims.t(), embeds, ids, mask, rerank_k, images_first=False),
                                          same.t())
    return report


def _same_caption(captions: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    return ids[:, None] == ids[None, :]


def _rerank(model, sims, embeds, ids, mask, k, images_first: bool, chunk: int = 64) -> torch.Tensor:
    """ITM P(match) for each query's top-k ITC candidates, placed above every other candidate (LAVIS's
    re-ranking keeps the rest in ITC order below them)."""
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices  # (Nq, k)
    scores = sims - sims.max() - 2  # everything outside the top-k stays below any probability
    query = torch.arange(sims.shape[0])[:, None].expand(-1, k).reshape(-1)
    cand = top.reshape(-1)
    image_idx, text_idx = (query, cand) if images_first else (cand, query)
    probs = []
    for start in range(0, len(query), chunk):
        i, t = image_idx[start : start + chunk], text_idx[start : start + chunk]
        logits = model.itm_logits(embeds[i].to(model.device), ids[t].to(model.device), mask[t].to(model.device))
        probs.append(logits.float().softmax(dim=-1)[:, 1].cpu())
    scores[query, cand] = torch.cat(probs)
    return scores


def run(config: EvalConfig) -> EvalReport:
    """Load the model with its tokenizers and image processor, read every sample of `specs` once, evaluate."""
    from capfilt.train.parts import Tokenize, load_parts

    parts = load_parts(config.model)
    model = parts.model.to(resolve_device(config.device))
    urls = expand_specs(config.specs, outputs=False)  # reads them, writes no per-shard output
    stream = PairStream(urls, ImageTransform(parts.image_processor), config.batch_size, resampled=False,
                        drop_last=False, seed=config.seed)
    stage1 = Tokenize(1, parts.tokenizer, model.config.max_text_length, fixed_length=True)  # re-ranking concatenates
    stage2 = None
    if model.has_language_model:
        stage2 = Tokenize(2, parts.tokenizer, model.config.max_text_length, parts.llm_tokenizer, model.config.prompt)
    return evaluate(model, stage1, load_pairs(stream, config.workers), stage2, config.rerank_k)
