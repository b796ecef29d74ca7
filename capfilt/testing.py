"""Tiny random BLIP / BLIP-2 checkpoints (captioners and ITM filters), Q-Former pre-training parts, VLM
captioners and CLIP / SigLIP filters built from real Hub files, for tests, benchmarks and smoke runs.

They are built from configs, saved with their processors, and meant to be loaded back through
`from_pretrained(dir)`, the same path a user's checkpoint takes. Sizes are parameters, so a benchmark can
ask for a model whose compute matters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capfilt.data.synth import COLOURS, POSITIONS, SHAPES

WORDS = (
    "a an the of in on with and at to is are picture photo man woman people dog cat bus train red blue green "
    "white black sitting standing street table plate food pizza sky water two three large small near next "
    "field grass building car truck bird horse bed room kitchen"
).split()
WORDS += sorted({w for phrase in [*COLOURS, *SHAPES, *POSITIONS.values()] for w in phrase.split()} - set(WORDS))


def _bert_tokenizer(vocab_size: int | None = None):
    """`vocab_size` pads the word list with unused tokens, e.g. to BLIP's 30,524, so the output layer costs what
    the real one does."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    words += [f"[unused{i}]" for i in range((vocab_size or 0) - 2 - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
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


def _image_processor(size):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": size, "width": size})


def _blip_config(tok, hidden=32, layers=2, image_size=32, patch=8):
    from transformers import BlipConfig

    vision = _vision(hidden, layers, image_size, patch)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=max(2, hidden // 64), encoder_hidden_size=hidden, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                eos_token_id=tok.sep_token_id, initializer_range=0.2)
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=16, image_text_hidden_size=16)


def _vision(hidden, layers, image_size, patch):
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=max(2, hidden // 64), image_size=image_size, patch_size=patch)


def _blip2_config(qformer_tok, llm_tok=None, text_input=False, hidden=32, layers=2, image_size=32, patch=8):
    from transformers import Blip2Config

    vision = _vision(hidden, layers, image_size, patch)
    qformer = dict(vocab_size=len(qformer_tok), hidden_size=hidden, intermediate_size=4 * hidden,
                   num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64), encoder_hidden_size=hidden,
                   cross_attention_frequency=2,
                   max_position_embeddings=64, pad_token_id=qformer_tok.pad_token_id,
                   use_qformer_text_input=text_input)
    text = None
    image_token = None
    if llm_tok is not None:
        image_token = llm_tok.convert_tokens_to_ids("<image>")
        text = dict(model_type="opt", vocab_size=len(llm_tok), hidden_size=hidden, ffn_dim=4 * hidden,
                    num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64), max_position_embeddings=128,
                    word_embed_proj_dim=hidden,
                    bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id,
                    pad_token_id=llm_tok.pad_token_id, init_std=0.2)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                       image_token_index=image_token, image_text_hidden_size=16)


def _save(model, tokenizer, path: Path, processor_cls, **processor_kwargs) -> str:
    model.save_pretrained(path)
    size = model.config.vision_config.image_size
    processor_cls(image_processor=_image_processor(size), tokenizer=tokenizer, **processor_kwargs).save_pretrained(path)
    return str(path)


def build_tiny_models(root: Path, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8,
                      seed: int = 0, vocab_size: int | None = None, blip2: bool = True) -> dict[str, str]:
    """Save four random checkpoints under `root`; returns their paths by role:
    blip_captioner, blip_itm (BLIP), blip2_captioner (tiny OPT as the LLM), blip2_itm (without `blip2`: BLIP's
    two only)."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipProcessor,
    )

    root = Path(root)
    torch.manual_seed(seed)
    size = dict(hidden=hidden, layers=layers, image_size=image_size, patch=patch)
    bert, llm = _bert_tokenizer(vocab_size), _llm_tokenizer()
    blip = _blip_config(bert, **size)
    paths = {
        "blip_captioner": _save(BlipForConditionalGeneration(blip), bert, root / "blip_cap", BlipProcessor),
        "blip_itm": _save(BlipForImageTextRetrieval(blip), bert, root / "blip_itm", BlipProcessor),
    }
    if not blip2:
        return paths
    captioner = Blip2ForConditionalGeneration(_blip2_config(bert, llm, **size))
    paths["blip2_captioner"] = _save(captioner, llm, root / "blip2_cap", Blip2Processor, num_query_tokens=4)
    itm = Blip2ForImageTextRetrieval(_blip2_config(bert, text_input=True, **size))
    with torch.no_grad():  # a zero-initialised ITM head would score everything 0.5 exactly
        itm.itm_head.weight.normal_(0, 0.5)
    paths["blip2_itm"] = _save(itm, bert, root / "blip2_itm", BlipProcessor)
    return paths


def blip2_filter_on_captioner_tower(models: dict[str, str], path: Path) -> str:
    """A copy of the BLIP-2 filter from `build_tiny_models`, given its captioner's vision tower weights, as
    BLIP-2's stage-1 filter and stage-2 captioner share their frozen one. Returns its path."""
    import shutil

    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    itm = Blip2ForImageTextRetrieval.from_pretrained(models["blip2_itm"])
    tower = Blip2ForConditionalGeneration.from_pretrained(models["blip2_captioner"]).vision_model
    itm.vision_model.load_state_dict(tower.state_dict())
    itm.save_pretrained(path)
    for part in Path(models["blip2_itm"]).iterdir():  # its tokenizer and processor
        if not (Path(path) / part.name).exists():
            shutil.copy(part, Path(path) / part.name)
    return str(path)


def build_tiny_qformer_parts(root: Path, hidden: int = 32, image_size: int = 32, seed: int = 0) -> dict[str, str]:
    """The pieces `capfilt pretrain` starts from, tiny and saved: a frozen BLIP-2 vision tower, the Q-Former's
    BERT-style tokenizer (with the synthetic world's words), a BERT with that tokenizer (`--qformer-init`)
    and a causal LLM (OPT) with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, Blip2VisionConfig, Blip2VisionModel, OPTConfig, OPTForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    vision = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, initializer_range=0.02))  # its default (1e-10) gives a constant tower
    vision.save_pretrained(root / "vision")
    _image_processor(image_size).save_pretrained(root / "vision")
    bert_tok = _bert_tokenizer()
    bert_tok.save_pretrained(root / "tokenizer")
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=hidden, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=4 * hidden, max_position_embeddings=64,
                               pad_token_id=bert_tok.pad_token_id)).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    llm_tok = _llm_tokenizer()
    llm = OPTForCausalLM(OPTConfig(
        vocab_size=len(llm_tok), hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, word_embed_proj_dim=hidden, bos_token_id=llm_tok.bos_token_id,
        eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id, init_std=0.2))
    llm.save_pretrained(root / "llm")
    llm_tok.save_pretrained(root / "llm")
    return {"vision": str(root / "vision"), "tokenizer": str(root / "tokenizer"), "bert": str(root / "bert"),
            "llm": str(root / "llm")}


# ------------------------------------------------------------------------------------------ real Hub files


def copy_hub_files(files: Path, out: Path) -> Path:
    """A real checkpoint's small files (config, tokenizer, processor) as its Hub repo has them; `.gz` unpacked."""
    import gzip
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(files).iterdir():
        if path.suffix == ".gz":
            (out / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        elif path.suffix in (".json", ".txt", ".jinja", ".model"):  # .model: SigLIP's sentencepiece spiece.model
            shutil.copy(path, out / path.name)
    return out


def _shallow(sub: dict, layers: int) -> dict:
    return {**sub, "num_hidden_layers": layers}


def build_hub_models(files: Path, root: Path, seed: int = 0) -> dict[str, str]:
    """Random checkpoints with the real Hub files under `files` (see tests/hub_files): only depth is shrunk,
    vocabularies, widths and special-token ids are the real ones (the LLM behind BLIP-2 is narrowed, keeping
    its vocabulary and ids). Returns paths by role: blip_captioner and blip_itm (blip-image-captioning-base's
    files; the BLIP ITM repos ship the same tokenizer), blip2_captioner (blip2-opt-2.7b's), blip2_itm (the
    BLIP-2 config as an ITM model with a BERT tokenizer plus `[DEC]`, as blip2-itm-vit-g has)."""
    import json

    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
    )

    files, root = Path(files), Path(root)
    torch.manual_seed(seed)
    paths = {}
    blip_files = files / "blip-image-captioning-base"
    blip = json.loads((blip_files / "config.json").read_text())
    blip["vision_config"] = _shallow(blip["vision_config"], 1)
    # initializer_range 0.2: a random BLIP decoder at 0.02 gives every image the same caption
    blip["text_config"] = {**_shallow(blip["text_config"], 1), "initializer_range": 0.2}
    for role, cls in (("blip_captioner", BlipForConditionalGeneration), ("blip_itm", BlipForImageTextRetrieval)):
        out = copy_hub_files(blip_files, root / role)
        cls(BlipConfig.from_dict(blip)).save_pretrained(out)
        _real_layout(out, {**blip, "architectures": [cls.__name__]})
        paths[role] = str(out)

    blip2_files = files / "blip2-opt-2.7b"
    blip2 = json.loads((blip2_files / "config.json").read_text())
    vision, qformer = _shallow(blip2["vision_config"], 1), _shallow(blip2["qformer_config"], 2)
    llm = {**blip2["text_config"], "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
           "num_attention_heads": 2, "word_embed_proj_dim": 64, "init_std": 0.2}
    out = copy_hub_files(blip2_files, root / "blip2_captioner")
    blip2 = {**blip2, "vision_config": vision, "qformer_config": qformer, "text_config": llm}
    Blip2ForConditionalGeneration(Blip2Config.from_dict(blip2)).save_pretrained(out)
    _real_layout(out, blip2)
    paths["blip2_captioner"] = str(out)

    out = root / "blip2_itm"
    bert = AutoTokenizer.from_pretrained(copy_hub_files(blip_files, root / "bert"))
    bert.add_special_tokens({"bos_token": "[DEC]"})  # BLIP-2's Q-Former tokenizer: BERT's plus [DEC]
    bert.save_pretrained(out)
    itm = Blip2ForImageTextRetrieval(Blip2Config.from_dict(
        {**blip2, "architectures": None, "vision_config": vision, "text_config": None,
         "qformer_config": {**qformer, "vocab_size": len(bert), "use_qformer_text_input": True}}))
    with torch.no_grad():  # a zero-initialised ITM head would score everything 0.5 exactly
        itm.itm_head.weight.normal_(0, 0.5)
    itm.save_pretrained(out)
    for name in ("preprocessor_config.json",):
        (out / name).write_bytes((blip2_files / name).read_bytes())
    paths["blip2_itm"] = str(out)
    return paths


def _real_layout(checkpoint: Path, config: dict) -> None:
    """The config as its Hub repo writes it (a 2022 upload's full dump, a 2024 one's sparse file), depth edited,
    in place of the one `save_pretrained` wrote in today's transformers layout."""
    import json

    (Path(checkpoint) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _sentencepiece_tokenizer(kind: str):
    """A small trained sentencepiece-style tokenizer (Metaspace "▁" words) with an `<image>` token: T5's
    unigram kind (no bos, `</s>` appended) or Llama's BPE kind (`<s>` in front), as Flan-T5 and Vicuna have."""
    from tokenizers import SentencePieceBPETokenizer, SentencePieceUnigramTokenizer
    from transformers import LlamaTokenizerFast, T5TokenizerFast

    texts = [" ".join(WORDS[i : i + 6]) for i in range(len(WORDS))] + ["A short image caption:"]
    if kind == "t5":
        raw = SentencePieceUnigramTokenizer()
        raw.train_from_iterator(texts, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
        return T5TokenizerFast(tokenizer_object=raw._tokenizer, pad_token="<pad>", eos_token="</s>",
                               unk_token="<unk>", extra_ids=0, additional_special_tokens=["<image>"])
    raw = SentencePieceBPETokenizer()
    raw.train_from_iterator(texts, vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    return LlamaTokenizerFast(tokenizer_object=raw._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<unk>", add_bos_token=True, additional_special_tokens=["<image>"])


def build_instructblip(files: Path, path: Path, llm: str = "t5", seed: int = 0) -> str:
    """A random InstructBLIP captioner (`llm`: "t5" as the Flan-T5 variants, "llama" as the Vicuna ones) on the
    real BLIP-2 vision and Q-Former settings of `files`/blip2-opt-2.7b, depth shrunk, its Q-Former reading
    the instruction through the real BERT vocabulary plus `[DEC]`; saved with InstructBlipProcessor."""
    import json

    from transformers import (
        AutoTokenizer,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    files, path = Path(files), Path(path)
    torch.manual_seed(seed)
    real = json.loads((files / "blip2-opt-2.7b" / "config.json").read_text())
    qformer_tok = AutoTokenizer.from_pretrained(copy_hub_files(files / "blip-image-captioning-base",
                                                               path.parent / f"{path.name}-bert"))
    qformer_tok.add_special_tokens({"bos_token": "[DEC]"})
    tok = _sentencepiece_tokenizer(llm)
    width = dict(hidden_size=64, num_attention_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id)
    if llm == "t5":
        text = dict(model_type="t5", d_model=64, d_kv=32, d_ff=128, num_layers=1, num_decoder_layers=1,
                    num_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id, initializer_factor=5.0)
    else:
        text = dict(model_type="llama", intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
                    bos_token_id=tok.bos_token_id, initializer_range=0.2, **width)
    config = InstructBlipConfig(
        vision_config=_shallow(real["vision_config"], 1), text_config=text, num_query_tokens=8,
        qformer_config={**_shallow(real["qformer_config"], 2), "vocab_size": len(qformer_tok)},
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    InstructBlipForConditionalGeneration(config).save_pretrained(path)
    image_processor = _image_processor(config.vision_config.image_size)
    InstructBlipProcessor(image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qformer_tok,
                          num_query_tokens=config.num_query_tokens).save_pretrained(path)
    return str(path)


def build_dual_encoders(files: Path, root: Path, seed: int = 0) -> dict[str, str]:
    """Random CLIP and SigLIP filters with the real Hub files under `files` (see tests/hub_files): depth and width
    shrunk (1 layer, 32 wide, 16-d embeddings), everything else as the real files have it: vocabularies, special
    ids, text positions (CLIP 77, SigLIP 64), image sizes and patches, processors, and each config in its Hub
    layout (CLIP's 4.16-era full dump with the old `eos_token_id` 2, SigLIP's sparse one). SigLIP's scale and bias
    are set away from their zero init (to exp 10 and -1), so that they count. Returns paths: clip, siglip."""
    import json
    import math

    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    files, root = Path(files), Path(root)
    torch.manual_seed(seed)
    narrow = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    paths = {}
    for role, folder, config_cls, model_cls in (("clip", "clip-vit-base-patch32", CLIPConfig, CLIPModel),
                                                ("siglip", "siglip-so400m-patch14-384", SiglipConfig, SiglipModel)):
        real = json.loads((files / folder / "config.json").read_text())
        config = {**real, "text_config": {**real["text_config"], **narrow},
                  "vision_config": {**real["vision_config"], **narrow}}
        for part in (config, config["text_config"], config["vision_config"]):
            if "projection_dim" in part:
                part["projection_dim"] = 16
        model = model_cls(config_cls.from_dict(config))
        if hasattr(model, "logit_bias"):
            with torch.no_grad():
                model.logit_scale.fill_(math.log(10.0))
                model.logit_bias.fill_(-1.0)
        out = copy_hub_files(files / folder, root / role)
        model.save_pretrained(out)
        _real_layout(out, config)
        paths[role] = str(out)
    return paths


# ------------------------------------------------------------------------------------------ VLM captioners

# The real Hub files (tests/hub_files) each VLM family is built from, by model type.
VLM_FILES = {"qwen2_vl": "Qwen2-VL-2B", "idefics3": "SmolVLM-256M-Instruct", "llava": "llava-1.5-7b-hf",
             "paligemma": "paligemma-3b-pt-224", "florence2": "Florence-2-base"}
# Qwen2-VL-2B-Instruct's turns (ChatML: <|im_start|>role ... <|im_end|>), written here: only the base model's
# files are at hand, whose chat_template.json places media without roles. A stand-in, not the Hub's bytes.
QWEN2_VL_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def _narrow(config: dict, **sizes) -> dict:
    return {**config, **sizes}


def _tiny_vlm_config(model_type: str, config: dict) -> dict:
    """The real config with depth and width shrunk; vocabularies, special and image token ids, image sizes,
    patch sizes and the layout (flat or nested, as the Hub file has it) kept."""
    if model_type == "qwen2_vl":  # head_dim 128 = 2 * sum(mrope_section), as the real one
        config = _narrow(config, hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_window_layers=2,
                         num_attention_heads=1, num_key_value_heads=1)
        config["vision_config"] = _narrow(config["vision_config"], depth=1, embed_dim=32, num_heads=2,
                                          hidden_size=128)
    elif model_type == "idefics3":
        config["text_config"] = _narrow(config["text_config"], hidden_size=64, intermediate_size=128, head_dim=32,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        config["vision_config"] = _narrow(config["vision_config"], hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2)
    elif model_type == "llava":  # two vision layers: it reads the second-to-last (vision_feature_layer -2)
        config["text_config"] = _narrow(config["text_config"], hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
        config["vision_config"] = _narrow(config["vision_config"], hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    elif model_type == "paligemma":
        config = _narrow(config, hidden_size=64, projection_dim=64)
        config["text_config"] = _narrow(config["text_config"], hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        config["vision_config"] = _narrow(config["vision_config"], hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, projection_dim=64)
    else:
        raise ValueError(f"no tiny build for {model_type!r}")
    return config


def paligemma_stand_in(config: dict, out: Path) -> None:
    """PaliGemma's tokenizer and processor files are not at hand (the checkpoint is gated): a stand-in word-level
    tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), its `<loc....>` / `<seg...>` tokens where
    Gemma has them (256000..257151) and `<image>` at the config's `image_token_index`, and the processor the
    Hub repo describes (SigLIP at 224 px, mean and std 0.5, 256 image tokens). Not the Hub's bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = specials + WORDS + ["caption", "en"]
    words += [f"<unused{i}>" for i in range(256000 - len(words))]
    words += [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
    image_token = config["image_token_index"]
    assert len(words) == image_token
    words.append("<image>")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", additional_special_tokens=["<image>"])
    image_processor = SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=3,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = config["text_config"]["num_image_tokens"]
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def build_vlm(files: Path, model_type: str, path: Path, seed: int = 0, chat_template: str | None = None) -> str:
    """A random VLM captioner of `model_type` from the real Hub files under `files` (`VLM_FILES`): only depth
    and width shrunk (`_tiny_vlm_config`), saved with `save_pretrained`, then the Hub files copied over what it
    wrote (config in the Hub's own layout, generation config, tokenizer, processor, chat template), so it loads
    as the user's checkpoint would. `chat_template`: one written into chat_template.json in place of the
    Hub's (a stand-in). Returns its path."""
    import json

    from transformers import AutoConfig, AutoModelForImageTextToText

    files, path = Path(files) / VLM_FILES[model_type], Path(path)
    torch.manual_seed(seed)
    if model_type == "florence2":
        return florence2_native_stand_in(files, path)
    config = _tiny_vlm_config(model_type, json.loads((files / "config.json").read_text()))
    copy_hub_files(files, path)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
    model.save_pretrained(path)
    copy_hub_files(files, path)  # the Hub's files over what save_pretrained wrote
    _real_layout(path, config)
    if model_type == "paligemma":
        paligemma_stand_in(config, path)
    if chat_template is not None:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    return str(path)


def florence2_native_stand_in(files: Path, path: Path) -> str:
    """A transformers-native Florence-2 (`Florence2ForConditionalGeneration`, as florence-community/Florence-2-base
    has it) converted from the original remote-code repo's files, whose own layout capfilt refuses. A stand-in:
    the native repo's files are not at hand. Its DaViT stages (`dim_embed` there, `embed_dim` here) and BART
    settings shrunk; the real BART tokenizer, padded with placeholder tokens to the config's vocabulary and given
    `<image>` (id 51289, transformers' default `image_token_id`) as its image token; the real image processor
    (768 px, 577 image tokens)."""
    import json

    from transformers import AutoTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    real_files = copy_hub_files(files, Path(path).parent / f"{Path(path).name}-hub")
    real = json.loads((real_files / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(real_files)
    tokenizer.add_tokens([f"<florence_{i}>" for i in range(real["vocab_size"] - len(tokenizer))])
    tokenizer.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens={"image_token": "<image>"})
    vision = {k: real["vision_config"][k] for k in ("patch_size", "patch_stride", "patch_padding", "patch_prenorm",
                                                    "window_size")}
    vision.update(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                  projection_dim=64)
    text = {**real["text_config"], "d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128, "vocab_size": len(tokenizer)}
    config = Florence2Config(text_config=text, vision_config=vision,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    Florence2ForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil.from_pretrained(real_files)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def build_siglip2_naflex(path: Path, seed: int = 0) -> str:
    """A random SigLIP 2 NaFlex filter (`Siglip2Model`: each image as patches at its own aspect ratio). No real
    SigLIP 2 files are at hand: its config class's defaults narrowed (1 layer, 32 wide; 64 text positions as the
    real ones), its image processor (patch 16) at 64 patches instead of 256, and as a stand-in for its Gemma
    tokenizer a small BPE trained on capfilt's word list with Gemma's special ids (pad 0, eos 1, bos 2, unk 3),
    which transformers reads as its `Siglip2Tokenizer`. Returns its path."""
    import math

    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    torch.manual_seed(seed)
    raw = SentencePieceBPETokenizer()
    raw.train_from_iterator([" ".join(WORDS[i : i + 6]) for i in range(len(WORDS))], vocab_size=400,
                            special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", mask_token="<mask>")
    narrow = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    model = Siglip2Model(Siglip2Config(text_config={**narrow, "vocab_size": len(tokenizer)},
                                       vision_config={**narrow, "num_patches": 64, "patch_size": 16}))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Siglip2ImageProcessorPil(patch_size=16, max_num_patches=64).save_pretrained(path)
    return str(path)
