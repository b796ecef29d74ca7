"""The Q-Former's stage-1 objectives (BLIP-2, section 3.2): their attention masks and their losses.

Hugging Face ships the Q-Former but none of these (transformers #22645, #34019), and LAVIS's versions are
the ones its users keep asking about. Everything here is pure tensor code; the model calls it.

Sequence layout for the joint passes: `[query_1 .. query_Q, text_1 .. text_T]`. The three masks:

- ITC, unimodal: queries see only queries, text only text. capfilt runs it as two separate passes (queries
  alone, text alone), which is the same thing and skips 2x the attention work.
- ITM, bidirectional: every position sees every query and every non-padding text token.
- ITG, multimodal causal (`itg_mask`): queries see only queries (they must not peek at the caption they are
  asked to generate); text token t sees every query and text tokens <= t.

Padding columns are masked in ITM and ITG; padding rows still see the queries, so no row is fully masked
(a fully masked softmax row is NaN under SDPA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1  # ITC and ITG, as in BLIP-2
IGNORE = -100


def itg_mask(num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, Q+T, Q+T) mask for ITG. text_mask: (B, T), 1 for real tokens, 0 for padding."""
    batch, length = text_mask.shape
    total = num_queries + length
    allowed = torch.zeros(total, total, dtype=torch.bool, device=text_mask.device)
    allowed[:num_queries, :num_queries] = True  # queries -> queries
    allowed[num_queries:, :num_queries] = True  # text -> all queries
    allowed[num_queries:, num_queries:] = torch.ones(length, length, dtype=torch.bool,
                                                     device=text_mask.device).tril()  # text -> earlier text
    columns = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device),
                         text_mask.bool()], dim=1)  # padding is never a key
    allowed = allowed[None] & columns[:, None, :]
    return additive(allowed[:, None], dtype)


def additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean "may attend" -> additive mask (0 or the dtype's most negative value), which both eager and SDPA
    attention accept."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------- ranks


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for this rank's slice. With DDP's
    gradient averaging this makes an R-process step equal a one-process step on the concatenated batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) over ranks in rank order; identity in one process."""
    if not distributed():
        return x
    if grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pad_to_global_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, T) tokens to the longest T over ranks (identity in one process), so that they can be
    gathered while each rank's batch is padded only to its own longest caption."""
    if not distributed():
        return input_ids, attention_mask
    length = torch.tensor(input_ids.shape[1], device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    extra = int(length.item()) - input_ids.shape[1]
    if extra == 0:
        return input_ids, attention_mask
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(attention_mask, (0, extra), value=0)


def row_offset(rows: int) -> int:
    """Index of this rank's first row in the gathered batch."""
    return dist.get_rank() * rows if distributed() else 0


# ----------------------------------------------------------------------------------------------- ITC


def similarities(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image to each text, the best of the image's queries.
    image_feats: (Bi, Q, E), text_feats: (Bt, E), both L2-normalised -> (Bi, Bt)."""
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def paired_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """`similarities` of row t's image to row t's text only (a filter's caption and its image), without the
    all-pairs matrix. image_feats: (T, Q, E), text_feats: (T, E) -> (T,)."""
    return torch.einsum("tqe,te->tq", image_feats, text_feats).amax(dim=-1)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor,
             temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss with in-batch negatives from every rank.

    image_feats: (B, Q, E) and text_feats: (B, E), this rank's, L2-normalised. Returns the loss and the
    detached similarity logits of this rank's images to all texts and of this rank's texts to all images,
    both (B, N) with N the global batch, for hard-negative mining.
    """
    all_images, all_texts = gather(image_feats), gather(text_feats)
    sim_i2t = similarities(image_feats, all_texts) / temp  # (B, N)
    sim_t2i = similarities(all_images, text_feats).t() / temp  # (B, N)
    targets = torch.arange(image_feats.shape[0], device=image_feats.device) + row_offset(image_feats.shape[0])
    loss = (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=LABEL_SMOOTHING)) / 2
    return loss, sim_i2t.detach(), sim_t2i.detach()


# ----------------------------------------------------------------------------------------------- ITM


def hard_negatives(logits: torch.Tensor, same: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """For each row, one column index drawn with probability softmax(logits) over the columns where `same` is
    False (the positive and any duplicate of it are never drawn).

    logits: (B, N) similarity logits; same: (B, N) bool; noise: (B, N) uniform(0, 1) numbers. The draw is the
    Gumbel-max trick on `noise`, so a caller that fixes the noise per (row, column) fixes the draw, whatever the
    number of ranks. Non-finite logits (fp16 overflow, LAVIS #107, BLIP #76) count as equal, never as NaN
    weights. Every row must allow at least one column. -> (B,) indices.
    """
    logits = torch.nan_to_num(logits.float(), nan=0.0, posinf=0.0, neginf=0.0)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    scores = (logits + gumbel).masked_fill(same, float("-inf"))
    return scores.argmax(dim=1)


def negative_noise(seed: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(2, N, N) uniform noise for the two hard-negative draws of a global batch of N, the same on every rank
    and for any number of ranks: each rank slices its own rows."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand((2, rows, cols), generator=generator).to(device)


def itm_pairs(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, sample_ids: torch.Tensor, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the gathered batch: a hard negative text for each local image and a hard negative image
    for each local text. sim_*: (B, N); sample_ids: (B,) this rank's ids (equal ids = same image)."""
    rows = sim_i2t.shape[0]
    all_ids = gather(sample_ids, grad=False)
    same = sample_ids[:, None] == all_ids[None, :]  # (B, N)
    start = row_offset(rows)
    positive = torch.arange(rows, device=same.device) + start
    only_duplicates = same.all(dim=1)  # a batch of copies of one image: any other row will have to do
    same[only_duplicates] = F.one_hot(positive[only_duplicates], same.shape[1]).bool()
    noise = negative_noise(seed, all_ids.shape[0], all_ids.shape[0], sim_i2t.device)
    neg_text = hard_negatives(sim_i2t, same, noise[0, start : start + rows])
    neg_image = hard_negatives(sim_t2i, same, noise[1, start : start + rows])
    return neg_text, neg_image


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """Labels of the 3B ITM pairs in the order (image, text), (negative image, text), (image, negative text)."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


# ----------------------------------------------------------------------------------------------- ITG


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss over the caption. logits: (B, T, V) at the text positions (position 0 holds `[DEC]`);
    input_ids, text_mask: (B, T). Position t predicts token t+1; padding targets are ignored."""
    targets = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, IGNORE)
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    return total / tokens_per_rank(targets)


def tokens_per_rank(targets: torch.Tensor) -> torch.Tensor:
    """The number of scored targets (not IGNORE) over all ranks, divided by the number of ranks. A rank's
    token-summed loss divided by this, after DDP's gradient averaging, is the mean over the global batch's
    tokens; dividing by the rank's own count would weigh a rank with short captions more."""
    count = (targets != IGNORE).sum().float()
    if distributed():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)
