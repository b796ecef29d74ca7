"""`capfilt export RUN_DIR OUT`: a capfilt BLIP-2 model as a plain transformers checkpoint.

A run directory already works as `--captioner` / `--filter`, but it needs capfilt to load (`capfilt-qformer`
is not a transformers model type). Exported, a model loads with transformers alone and can go to the Hugging
Face Hub like Salesforce's BLIP-2 checkpoints: a stage-2 model as `Blip2ForConditionalGeneration` with a
`Blip2Processor`, a stage-1 model as `Blip2ForImageTextRetrieval` with a `BlipProcessor` (which is what
`AutoProcessor` gives for either). Only BLIP-2 vision towers map onto those classes.

The weights map one to one (capfilt's names follow transformers'), except that `ln_vision` goes back into the
tower as `vision_model.post_layernorm` and what transformers has no place for is dropped: `itg_head` and `temp`
(training only), the language parts of a stage-1 model, and the text-only parts of a stage-2 model (its
Q-Former is written with `use_qformer_text_input=False`, as transformers' captioning checkpoints are).

transformers' BLIP-2 marks the query positions with `num_query_tokens` copies of an image token in front of
the prompt, so the exported LLM tokenizer needs one: `<image>` is reused if the tokenizer has it, takes a spare
embedding row if the LLM has one (OPT does), or else is added and the LLM's embeddings grow by a row. That
row's input embedding is never read (the query outputs replace it), but its output row gives the LLM one more
logit. It is set to the mean of the other output rows, so the new logit is the mean of the original ones: never
the largest, and greedy decoding stays exactly capfilt's. Beam search and sampling give it a tiny probability;
pass `suppress_tokens=[image_token_index]` to `generate` to rule it out exactly.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from capfilt.data.files import publish
from capfilt.errors import CapfiltError
from capfilt.models.loading import load_config
from capfilt.models.qformer import MODEL_TYPE, TEXT_FFN, QFormerModel

LLM_TOKENIZER = "llm_tokenizer"  # the subfolder a stage-2 run directory keeps the LLM tokenizer in
ALWAYS_DROPPED = re.compile(r"^(itg_head\.|temp$)")
STAGE1_DROPPED = re.compile(r"^(language_model|language_projection)\.")
STAGE2_DROPPED = re.compile(r"^(embeddings|vision_projection|text_projection|itm_head)\.")


@dataclass(frozen=True)
class ExportResult:
    out: str
    model_class: str  # Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval
    image_token_index: int | None = None  # stage 2: the LLM token id that marks the query positions
    prompt: str = ""  # stage 2: the prompt the model was trained behind, to pass as the processor's text


def export(run_dir: str, out: str, overwrite: bool = False) -> ExportResult:
    """Write RUN_DIR's model to OUT as a transformers BLIP-2 checkpoint with its processor (atomically)."""
    out = os.path.normpath(out)
    config = _check(run_dir, out, overwrite)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _write(run_dir, tmp, out, stage2=config.text_config is not None)
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        elif os.path.lexists(out):
            os.remove(out)
        publish(Path(tmp), Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check(run_dir: str, out: str, overwrite: bool):
    if not os.path.isdir(run_dir):
        raise CapfiltError(f"run directory {run_dir!r}: no such directory")
    config = load_config(run_dir, "run directory")
    if config.model_type != MODEL_TYPE:
        raise CapfiltError(f"{run_dir!r} holds a {config.model_type!r} model, not a capfilt Q-Former model "
                           "(`capfilt pretrain` output)")
    tower = config.vision_config.model_type
    if tower != "blip_2_vision_model":
        raise CapfiltError(f"{run_dir!r} uses a {tower!r} vision tower: only BLIP-2 vision towers map onto "
                           "transformers' BLIP-2 classes; the run directory itself is usable as --captioner/--filter")
    if config.text_config is not None and config.text_config.is_encoder_decoder:
        raise CapfiltError(f"{run_dir!r} has an encoder-decoder LLM ({config.text_config.model_type!r}), "
                           "which capfilt's stage 2 does not support")
    if config.text_config is None and config.text_pooling != "cls":  # stage 2 keeps no ITC to disagree on
        raise CapfiltError(f"{run_dir!r} pools its ITC text feature by {config.text_pooling!r}, and "
                           "Blip2ForImageTextRetrieval reads [CLS]: its export would score other similarities")
    if os.path.realpath(out) == os.path.realpath(run_dir):
        raise CapfiltError("the export cannot replace its own run directory; give another OUT")
    if os.path.lexists(out) and not overwrite and not (os.path.isdir(out) and not os.listdir(out)):
        raise CapfiltError(f"{out!r} exists and is not empty; pass --overwrite to replace it")
    return config


def _write(run_dir: str, tmp: str, out: str, stage2: bool) -> ExportResult:
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        BlipProcessor,
    )

    model = QFormerModel.from_pretrained(run_dir)
    image_processor = AutoImageProcessor.from_pretrained(run_dir)
    qformer_config = _plain(model.config.qformer_config)
    common = dict(vision_config=_plain(model.config.vision_config), num_query_tokens=model.config.num_query_tokens,
                  image_text_hidden_size=model.config.embed_dim)
    if stage2:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, LLM_TOKENIZER))
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens)
        image_token = str(processor.image_token)
        image_token_index = tokenizer.convert_tokens_to_ids(image_token)
        if tokenizer(image_token * 2, add_special_tokens=False)["input_ids"] != [image_token_index] * 2:
            raise CapfiltError(f"the LLM tokenizer does not keep {image_token!r} as one token; cannot export")
        _make_room(model.language_model, image_token_index)
        qformer_config["use_qformer_text_input"] = False
        config = Blip2Config(qformer_config=qformer_config, text_config=_plain(model.language_model.config),
                             image_token_index=image_token_index, **common)
        cls, dropped = Blip2ForConditionalGeneration, STAGE2_DROPPED
    else:
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        processor, image_token_index = BlipProcessor(image_processor, tokenizer), None
        config = Blip2Config(qformer_config=qformer_config, image_token_index=None, **common)
        cls, dropped = Blip2ForImageTextRetrieval, STAGE1_DROPPED

    state = {}
    for name, tensor in model.state_dict().items():
        if ALWAYS_DROPPED.match(name) or dropped.match(name) or (
                stage2 and name.startswith("qformer.") and TEXT_FFN.search(name)):
            continue
        state[re.sub(r"^ln_vision\.", "vision_model.post_layernorm.", name)] = tensor
    with torch.device("meta"):  # no random init of weights that are all about to be replaced
        exported = cls(config)
    loaded = exported.load_state_dict(state, strict=False, assign=True)
    if loaded.missing_keys or loaded.unexpected_keys:
        raise CapfiltError(f"{run_dir!r} does not map onto {cls.__name__}: missing {_few(loaded.missing_keys)}; "
                           f"unexpected {_few(loaded.unexpected_keys)}")
    exported.tie_weights()  # assign=True replaced the tied parameters by separate ones
    exported.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return ExportResult(out=out, model_class=cls.__name__, image_token_index=image_token_index,
                        prompt=model.config.prompt if stage2 else "")


@torch.no_grad()
def _make_room(llm, token_id: int) -> None:
    """Give `token_id` an embedding row (resizing if the matrix has no spare one); new output rows get the
    mean of the old ones, so their logit is the mean logit and never the largest."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id < rows:
        return
    llm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    head = llm.get_output_embeddings()
    for weight in (llm.get_input_embeddings().weight, head.weight if head is not None else None,
                   getattr(head, "bias", None)):
        if weight is not None:
            weight[rows:] = weight[:rows].mean(dim=0)


def _plain(config) -> dict:
    """A sub-config as a dict, without the local path it was loaded from (the export may go to the Hub)."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
