"""VLM captioners built from real Hub files (tests/hub_files: Qwen2-VL-2B, SmolVLM-256M-Instruct,
llava-1.5-7b-hf, paligemma-3b-pt-224, Florence-2-base), random weights, only depth and width shrunk, loaded
through the same `from_pretrained(dir)` path and the CLI a user's checkpoint takes.

Stand-ins (see capfilt.testing): the Qwen2-VL files are the base model's, so the instruction-tuned captioner
gets a ChatML chat template written for the test (the base model's real template is tested for what it does:
it places no image in a user turn); PaliGemma's tokenizer and processor are not at hand, so it gets a
word-level tokenizer with Gemma's special and image token ids and the processor its Hub repo describes;
Florence-2's files are the original remote-code layout, which capfilt refuses (tested), so the captioning tests
run a native-layout conversion of them (`capfilt.testing.florence2_native_stand_in`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import cli, demo_samples, interrupted_at_batch, outputs, png_bytes, write_tar
from transformers import AutoProcessor, BertConfig, GenerationConfig

from capfilt.data.reader import decode_image
from capfilt.models.captioner import load_captioner
from capfilt.models.vlm import INSTRUCTION, VlmCaptioner, collate, end_of_text_ids
from capfilt.settings import CaptionerConfig
from capfilt.testing import QWEN2_VL_INSTRUCT_TEMPLATE, build_vlm, copy_hub_files

HUB_FILES = Path(__file__).parent / "hub_files"
FAMILIES = ("qwen2_vl", "idefics3", "llava", "paligemma", "florence2")
# What a prompt or chat template would leave in a caption that kept it.
TEMPLATE_TEXT = (INSTRUCTION, "Describe this image", "caption en", "USER:", "ASSISTANT:", "Assistant:", "User:",
                 "<|im_start|>", "<|vision_start|>", "<image>", "<end_of_utterance>", "<CAPTION>",
                 "What does the image describe?")


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlms")
    models = {family: build_vlm(HUB_FILES, family, root / family,
                                chat_template=QWEN2_VL_INSTRUCT_TEMPLATE if family == "qwen2_vl" else None)
              for family in FAMILIES}
    models["qwen2_vl_base"] = build_vlm(HUB_FILES, "qwen2_vl", root / "qwen2_vl_base")  # its real template
    return models


@pytest.fixture(scope="module")
def images():
    return [decode_image(s["jpg"]) for s in demo_samples(2)]


def rows(out: Path) -> list[dict]:
    return [row for path in sorted(out.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


# ----------------------------------------------------------------------------------------------- the processor


@pytest.mark.parametrize("family", ["idefics3", "llava", "paligemma", "florence2"])
def test_composed_processor_gives_what_the_full_processor_gives(vlms, images, family):
    """Where transformers' AutoProcessor can be built here, capfilt's processor (the same class from the PIL
    image processor, tokenizer and chat template) gives the same input ids and pixels, per image and, collated,
    for the batch; through pickling too (the DataLoader workers)."""
    captioner = load_captioner(CaptionerConfig(model=vlms[family]))
    full = AutoProcessor.from_pretrained(vlms[family])
    ours = [captioner.preprocess(image) for image in images]
    for image, mine in zip(images, ours):
        theirs = full(images=[image], text=[captioner.preprocess.text], return_tensors="pt")
        for key, value in mine.items():  # a pixel mask comes as bool (Idefics3's), with the same values
            assert torch.equal(value, theirs[key].to(value.dtype)), key
    batch = full(images=images, text=[captioner.preprocess.text] * len(images), padding=True, padding_side="left",
                 return_tensors="pt")
    collated = collate(ours, captioner.pad_token_id, "left")
    for key, value in collated.items():
        assert torch.equal(value, batch[key].to(value.dtype)), key
    copy = pickle.loads(pickle.dumps(captioner.preprocess))
    assert all(torch.equal(copy(images[0])[k], v) for k, v in ours[0].items())
    assert all(v.dtype != torch.int64 for k, v in ours[0].items() if k == "pixel_attention_mask")
    assert copy.signature == captioner.preprocess.signature


def test_qwen2_vl_without_torchvision_expands_the_image_placeholder_as_its_processor(vlms, images):
    """AutoProcessor of Qwen2-VL builds a video processor, which needs torchvision: where it cannot be built,
    the placeholder count is what Qwen2VLProcessor writes (grid_t * grid_h * grid_w / merge_size^2) and the
    pixels are its PIL image processor's, image by image; where it can, both agree exactly."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    captioner = load_captioner(CaptionerConfig(model=vlms["qwen2_vl"]))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(vlms["qwen2_vl"])
    pad = captioner.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for image in images:
        mine = captioner.preprocess(image)
        pixels = image_processor(images=[image], return_tensors="pt")
        assert torch.equal(mine["pixel_values"], pixels["pixel_values"])
        assert torch.equal(mine["image_grid_thw"], pixels["image_grid_thw"])
        assert (mine["input_ids"] == pad).sum() == int(pixels["image_grid_thw"].prod()) // 4
        text = captioner.tokenizer.decode(mine["input_ids"][0])
        assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
        assert text.endswith(f"<|vision_end|>{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    try:
        full = AutoProcessor.from_pretrained(vlms["qwen2_vl"])
    except ImportError:  # no torchvision (this machine): the checks above are the comparison
        return
    theirs = full(images=[images[0]], text=[captioner.preprocess.text], return_tensors="pt")
    assert all(torch.equal(v, theirs[k]) for k, v in captioner.preprocess(images[0]).items())


def test_collate_pads_prompts_in_front_and_crops_with_zeros():
    rows_ = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
              "pixel_values": torch.ones(1, 2, 3)},
             {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": torch.ones(1, 1, 3)}]
    batch = collate(rows_, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (2, 2, 3) and batch["pixel_values"][1, 1].tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------------------------- generation


def test_end_of_text_is_the_generation_configs_and_the_tokenizers():
    """instructblip-vicuna-7b's generation_config.json says eos 1 (`<s>`) while its tokenizer ends text with
    `</s>` (2): captions must stop at 2 as well. Qwen2-VL's lists two ids."""
    tokenizer = type("Tok", (), {"eos_token_id": 2})()
    assert end_of_text_ids(GenerationConfig(eos_token_id=1), tokenizer) == [1, 2]
    assert end_of_text_ids(GenerationConfig(eos_token_id=[151645, 151643]), tokenizer) == [151645, 151643, 2]
    assert end_of_text_ids(GenerationConfig(eos_token_id=2), tokenizer) == [2]


def test_each_family_ends_captions_at_its_own_end_of_text(vlms):
    expected = {"qwen2_vl": [151645, 151643], "idefics3": [49279], "llava": [2], "paligemma": [1], "florence2": [2]}
    for family, ids in expected.items():
        captioner = load_captioner(CaptionerConfig(model=vlms[family]))
        assert isinstance(captioner, VlmCaptioner) and captioner.eos_token_ids == ids, family
        # Decoder-only prompts are padded in front; Florence-2's encoder reads its prompt (one length) as is.
        assert captioner.encoder_decoder == (family == "florence2")
        assert captioner.padding_side == ("right" if family == "florence2" else "left")


def test_k_captions_per_image_one_generate_per_batch_seeded(vlms, images, monkeypatch):
    captioner = load_captioner(CaptionerConfig(model=vlms["llava"], num_captions=3, max_new_tokens=6))
    inputs = [captioner.preprocess(image) for image in images]
    calls = []
    generate = captioner.model.generate
    monkeypatch.setattr(captioner.model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    first = captioner(inputs, seed=3)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == len(images)
    assert [len(c) for c in first] == [3, 3]
    assert captioner(inputs, seed=3) == first and captioner(inputs, seed=4) != first
    assert calls[0]["do_sample"] and calls[0]["top_p"] == 0.9 and calls[0]["top_k"] == 50
    assert calls[0]["temperature"] == 1.0 and calls[0]["repetition_penalty"] == 1.1


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return write_tar(tmp_path_factory.mktemp("in") / "demo-00000.tar", demo_samples(2))


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_through_the_cli_gives_k_captions_without_prompt_or_template(vlms, shard, tmp_path, family):
    out = tmp_path / "out"
    result = cli("caption", shard, "--out", out, "--captioner", vlms[family], "--num-captions", 2,
                 "--max-new-tokens", 8, "--batch-size", 2, "--workers", 1, "--quiet")
    assert result.exit_code == 0, result.output
    found = rows(out)
    assert len(found) == 2 and all(row["status"] == "ok" for row in found)
    for row in found:
        assert len(row["synthetic_captions"]) == 2
        for caption in row["synthetic_captions"]:
            assert caption == caption.strip() and "\n" not in caption
            assert not any(text in caption for text in TEMPLATE_TEXT), caption
    assert any(caption for row in found for caption in row["synthetic_captions"])
    manifest = json.loads((out / "capfilt_run.json").read_text())
    assert manifest["settings"]["captioner"]["max_new_tokens"] == 8
    assert "max_length" not in manifest["settings"]["captioner"]  # a VLM's lengths are new tokens


def test_bootstrap_with_a_vlm_captioner_resumes_to_the_same_bytes(vlms, tiny_models, tmp_path):
    """A Qwen2-VL captioner (image-dependent prompt lengths: left padding matters) and a BLIP filter: a run
    interrupted after its first shard, then rerun, writes what an uninterrupted run writes."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "a-00000.tar", demo_samples(2))
    write_tar(inputs / "a-00001.tar", demo_samples(2, start=2))
    args = ["--captioner", vlms["qwen2_vl"], "--filter", tiny_models["blip_itm"], "--num-captions", 2,
            "--max-new-tokens", 6, "--batch-size", 2, "--workers", 0, "--quiet"]
    reference = tmp_path / "reference"
    assert cli("bootstrap", inputs, "--out", reference, *args).exit_code == 0

    out = tmp_path / "resumed"
    with interrupted_at_batch(2):  # the second shard's first batch
        assert cli("bootstrap", inputs, "--out", out, *args).exit_code != 0
    assert [p.name for p in out.glob("*_stats.json")] == ["a-00000_stats.json"]
    assert cli("bootstrap", inputs, "--out", out, *args).exit_code == 0
    assert outputs(out) == outputs(reference)
    assert all(len(row["synthetic_captions"]) == 2 for row in rows(out) if row["status"] != "error")


def test_an_image_its_processor_refuses_becomes_an_error_row(vlms, tmp_path):
    """Qwen2-VL's processor refuses an aspect ratio over 200: that sample gets a reason, the others captions."""
    inputs = write_tar(tmp_path / "in.tar", [*demo_samples(1), {"__key__": "thin", "png": png_bytes((600, 2)),
                                                                 "txt": b"a line"}])
    out = tmp_path / "out"
    result = cli("caption", inputs, "--out", out, "--captioner", vlms["qwen2_vl"], "--max-new-tokens", 4,
                 "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    by_key = {row["key"]: row for row in rows(out)}
    assert by_key["thin"]["status"] == "error" and by_key["thin"]["reason"] == "image_rejected"
    assert "aspect ratio" in by_key["thin"]["detail"]
    assert sum(row["status"] == "ok" for row in by_key.values()) == 1


def test_prompt_overrides_the_instruction(vlms, images):
    captioner = load_captioner(CaptionerConfig(model=vlms["idefics3"], prompt="What is in this photo?"))
    assert captioner.preprocess.text == ("<|im_start|>User:<image>What is in this photo?<end_of_utterance>\n"
                                         "Assistant:")


def test_a_base_template_without_an_image_turn_is_one_line_and_prompt_is_the_way_out(vlms, shard, tmp_path):
    result = cli("caption", shard, "--out", tmp_path / "o", "--captioner", vlms["qwen2_vl_base"], "--quiet")
    assert result.exit_code == 2 and "chat template places no image" in result.output
    assert len(result.output.strip().splitlines()) == 1
    prompt = "<|vision_start|><|image_pad|><|vision_end|>a photo of"
    captioner = load_captioner(CaptionerConfig(model=vlms["qwen2_vl_base"], prompt=prompt, max_new_tokens=4))
    assert captioner.preprocess.text == prompt
    assert len(captioner([captioner.preprocess(decode_image(demo_samples(1)[0]["jpg"]))], seed=0)[0]) == 1


def test_florence2_in_its_remote_code_layout_is_one_line_naming_the_native_conversion(tmp_path, shard):
    model = copy_hub_files(HUB_FILES / "Florence-2-base", tmp_path / "florence")
    result = cli("caption", shard, "--out", tmp_path / "o", "--captioner", model, "--quiet")
    assert result.exit_code == 2
    assert "transformers-native conversion such as florence-community/Florence-2-base" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_unusable_checkpoint_is_one_line_naming_the_families(tmp_path, shard):
    BertConfig().save_pretrained(tmp_path / "bert")
    result = cli("caption", shard, "--out", tmp_path / "o", "--captioner", tmp_path / "bert", "--quiet")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    for family in ("BLIP", "BLIP-2", "InstructBLIP", "Qwen2-VL", "SmolVLM", "LLaVA", "PaliGemma", "Florence-2"):
        assert family in result.output
