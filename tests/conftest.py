"""Tiny BLIP / BLIP-2 captioners and filters built from configs, saved, and loaded back through
`from_pretrained(dir)` exactly as a user's checkpoint is; shard builders with real COCO JPEGs and bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARDS = sorted((REPO / "shards").glob("demo-*.tar"))
WORDS = (
    "a an the of in on with and at to is are picture photo man woman people dog cat bus train red blue green "
    "white black sitting standing street table plate food pizza sky water two three large small near next "
    "field grass building car truck bird horse bed room kitchen"
).split()


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    # datasets writes lock files under HF_HOME even with cache_dir; never the user's or CI's home.
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bert_tokenizer():
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    # BLIP's tokenizer: BERT's plus [DEC] (bos) and [ENC], in that order.
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"])


def _llm_tokenizer():
    """A word-level tokenizer that, like OPT's, puts <s> in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def _image_processor(size=32):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": size, "width": size})


def _blip_config(tok):
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                eos_token_id=tok.sep_token_id, initializer_range=0.2)
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=16, image_text_hidden_size=16)


def _blip2_config(qformer_tok, llm_tok=None, text_input=False):
    from transformers import Blip2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    qformer = dict(vocab_size=len(qformer_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, encoder_hidden_size=32, cross_attention_frequency=2,
                   max_position_embeddings=64, pad_token_id=qformer_tok.pad_token_id,
                   use_qformer_text_input=text_input)
    text = None
    image_token = None
    if llm_tok is not None:
        image_token = llm_tok.convert_tokens_to_ids("<image>")
        text = dict(model_type="opt", vocab_size=len(llm_tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                    bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id,
                    pad_token_id=llm_tok.pad_token_id, init_std=0.2)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                       image_token_index=image_token, image_text_hidden_size=16)


def _save(model, tokenizer, path: Path, processor_cls, **processor_kwargs) -> str:
    model.save_pretrained(path)
    processor_cls(image_processor=_image_processor(), tokenizer=tokenizer, **processor_kwargs).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of saved tiny checkpoints: blip_captioner, blip_itm, blip2_captioner, blip2_itm."""
    from transformers import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor,
                              BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor)

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert, llm = _bert_tokenizer(), _llm_tokenizer()
    blip = _blip_config(bert)
    paths = {
        "blip_captioner": _save(BlipForConditionalGeneration(blip), bert, root / "blip_cap", BlipProcessor),
        "blip_itm": _save(BlipForImageTextRetrieval(blip), bert, root / "blip_itm", BlipProcessor),
    }
    blip2 = _blip2_config(bert, llm)
    paths["blip2_captioner"] = _save(Blip2ForConditionalGeneration(blip2), llm, root / "blip2_cap", Blip2Processor,
                                     num_query_tokens=4)
    itm = Blip2ForImageTextRetrieval(_blip2_config(bert, text_input=True))
    with torch.no_grad():  # a zero-initialised ITM head would score everything 0.5 exactly
        itm.itm_head.weight.normal_(0, 0.5)
    paths["blip2_itm"] = _save(itm, bert, root / "blip2_itm", BlipProcessor)
    return paths


# ------------------------------------------------------------------------------------------------ shards


def demo_samples(n: int, start: int = 0) -> list[dict]:
    """Real COCO samples (jpg bytes, caption, json) from the bundled demo shards."""
    samples = []
    for sample in wds.WebDataset([str(p) for p in DEMO_SHARDS], shardshuffle=False, empty_check=False):
        samples.append({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"],
                        "json": sample["json"]})
        if len(samples) == start + n:
            break
    return samples[start:]


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return path


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def bad_samples() -> list[dict]:
    """One good sample between each kind of bad input, keys saying what each is."""
    good = demo_samples(6)
    jpg = good[0]["jpg"]
    return [
        {**good[0], "__key__": "good0"},
        {**good[1], "__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg"},
        {**good[2], "__key__": "truncjpg", "jpg": jpg[: len(jpg) // 3]},
        {"__key__": "nocaption", "jpg": good[3]["jpg"]},
        {**good[3], "__key__": "latin1", "txt": "caf\xe9 au lait".encode("latin-1"), "json": b"{}"},
        {"__key__": "noimage", "txt": b"a caption without a picture"},
        {**good[4], "__key__": "good1"},
        {**good[5], "__key__": "jsoncap", "txt": None, "json": json.dumps({"caption": "a cat on a table"}).encode()},
    ]


def strip_none(samples):
    return [{k: v for k, v in s.items() if v is not None} for s in samples]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
