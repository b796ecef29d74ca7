"""Captioner for any image-text-to-text VLM transformers loads (`AutoModelForImageTextToText`: Qwen2-VL and its
successors, SmolVLM / Idefics3, LLaVA, PaliGemma, Florence-2, ...), beside the BLIP family's `Captioner`.

The prompt goes through the model's own processor: with a chat template, one user turn holding the image and
the instruction, then the assistant's generation prompt; without one, the model's own task prefix (PaliGemma's
"caption en", Florence-2's "<CAPTION>"). The caption is the assistant's new text only. Sampling is BLIP's
CapFilt sampling (`CaptionerConfig`), K captions per image, one `generate` per batch.

The processor is always the checkpoint's own processor class, built from its PIL image processor, its tokenizer,
its chat template and its processor settings; sub-processors captioning does not use (a video processor) are
left out. So the same preprocessing runs on every machine, and on machines without torchvision too (in
transformers 5 a video processor needs torchvision, and `AutoProcessor` of Qwen2-VL builds one).
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, PretrainedConfig

from capfilt.errors import CapfiltError
from capfilt.models.loading import TORCH_DTYPES, load_config, load_tokenizer, resolve_device
from capfilt.settings import CaptionerConfig

log = logging.getLogger(__name__)

# A chat model is asked for what web alt-text is: one short sentence.
INSTRUCTION = "Describe this image in one short sentence."
# Models without a chat template caption from the task prefix they were trained with (by model type: a
# family's later checkpoints, e.g. PaliGemma 2, share it).
PREFIXES = {"paligemma": "caption en", "florence2": "<CAPTION>"}
# Processors that want their image token in front of a prefix prompt (else they add it, warning per image).
IMAGE_FIRST = ("paligemma",)
# Families whose Hub checkpoints once shipped their own modelling code, and the native conversion to use instead.
NATIVE_CONVERSIONS = {"florence2": "florence-community/Florence-2-base"}
# Processor outputs aligned with the prompt's tokens (padded along the sequence, not stacked).
TOKEN_ALIGNED = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def is_vlm(config: PretrainedConfig) -> bool:
    """Whether transformers' image-text-to-text auto class loads this config's model type (as it decides)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


# ----------------------------------------------------------------------------------------------- the processor


def _lenient(cls: type) -> type:
    """`cls` accepting None for a sub-processor (its base class check would import torchvision for a video one)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def build_processor(cls: type, parts: dict, processor_dict: dict, kwargs: dict):
    """The processor class `cls` from the sub-processors in `parts` (by attribute name; missing ones None) and
    its saved settings (`processor_config.json`, chat template), as `from_pretrained` would assemble it."""
    args = [parts.get(name) for name in cls.get_attributes()]
    if any(arg is None for arg in args):
        cls = _lenient(cls)
    return cls.from_args_and_dict(args, dict(processor_dict), **kwargs)


def load_processor(name: str, config: PretrainedConfig) -> tuple[type, dict, dict, dict]:
    """The pieces of a checkpoint's processor: its class (transformers' auto mapping for the model type, or the
    `processor_class` it names), its PIL image processor and tokenizer, and its saved processor settings."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    try:
        image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")
    except (OSError, ValueError, TypeError, ImportError) as exc:
        raise CapfiltError(f"captioner {name!r} has no usable image processor (preprocessor_config.json): "
                           f"{str(exc).strip().splitlines()[0]}") from None
    class_name = PROCESSOR_MAPPING_NAMES.get(config.model_type) or image_processor.to_dict().get("processor_class")
    cls = processor_class_from_name(class_name) if class_name else None
    if cls is None:
        raise CapfiltError(f"captioner {name!r}: transformers knows no processor for a {config.model_type!r} model")
    tokenizer = load_tokenizer(name, "captioner")
    processor_dict, kwargs = cls.get_processor_dict(name)
    return cls, {"image_processor": image_processor, "tokenizer": tokenizer}, processor_dict, kwargs


class VlmPreprocess:
    """The `Preprocess` of a VLM captioner (see capfilt.data.reader): one image -> its processor's inputs for
    the captioning prompt: `input_ids` and `attention_mask` (1, L) with the image placeholders expanded as the
    processor does, and the image tensors (pixel values, grids, crops), for that image alone.

    Picklable: it carries the processor's parts and rebuilds the processor where it is unpickled."""

    def __init__(self, cls: type, parts: dict, processor_dict: dict, kwargs: dict, text: str):
        self.cls, self.parts, self.processor_dict, self.kwargs, self.text = cls, parts, processor_dict, kwargs, text
        self.processor = build_processor(cls, parts, processor_dict, kwargs)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "processor"}

    def __setstate__(self, state):
        self.__init__(**{k: state[k] for k in ("cls", "parts", "processor_dict", "kwargs", "text")})

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        out = self.processor(images=[image], text=[self.text], return_tensors="pt")
        # No labels: generation does not train (PaliGemma's processor returns them for its prefix).
        inputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "labels"}
        for key, value in inputs.items():
            # A pixel mask as bool, not int64: Idefics3's is 13 crops x 512 x 512 per image, 27 MB as int64,
            # held several batches deep in the DataLoader's prefetch. The models read it as a truth value.
            if key.endswith("mask") and key not in TOKEN_ALIGNED and not value.is_floating_point():
                inputs[key] = value.bool()
        return inputs

    @property
    def signature(self) -> str:
        return f"{self.cls.__name__}\n{self.parts['image_processor'].to_json_string()}\n{self.text}"


def collate(rows: list[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "left"
            ) -> dict[str, torch.Tensor]:
    """One batch from per-image processor outputs, as the processor would make it from the whole list: the
    prompt's tokens padded to the longest (`padding_side`; `input_ids` with `pad_token_id`, masks with 0),
    per-image tensors concatenated along their first axis (patch rows: Qwen2-VL's `pixel_values`), zero-padded
    first where their shapes differ (Idefics3's crops: an all-zero crop is padding to it)."""
    batch = {}
    length = max(row["input_ids"].shape[-1] for row in rows)
    for key in rows[0]:
        values = [row[key] for row in rows]
        if key in TOKEN_ALIGNED:
            fill = pad_token_id if key == "input_ids" else 0
            values = [_pad_tokens(v, length, fill, padding_side) for v in values]
        elif any(v.shape[1:] != values[0].shape[1:] for v in values):
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            values = [_pad_zeros(v, shape) for v in values]
        batch[key] = values[0] if len(values) == 1 else torch.cat(values)
    return batch


def _pad_tokens(tensor: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    pad = length - tensor.shape[-1]
    if not pad:
        return tensor
    filler = torch.full((*tensor.shape[:-1], pad), fill, dtype=tensor.dtype)
    return torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=-1)


def _pad_zeros(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(tensor.shape[1:]) == shape:
        return tensor
    out = tensor.new_zeros((tensor.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in tensor.shape[1:]))] = tensor
    return out


# ----------------------------------------------------------------------------------------------- the captioner


class VlmCaptioner:
    """`captioner(inputs, seed)` -> for each image, `num_captions` captions: the assistant's new text only.

    inputs: one entry per image from `self.preprocess`. Built once at the entry point; touches no paths after."""

    # Settings this captioner does not read: BLIP's lengths count its prompt; a VLM's are new tokens.
    unused_settings = ("max_length", "min_length")

    def __init__(self, config: CaptionerConfig):
        self.config = config
        name = config.model
        model_config = load_config(name, "captioner")
        self.kind = model_config.model_type
        self._refuse_remote_code(name, model_config)
        cls, parts, processor_dict, kwargs = load_processor(name, model_config)
        tokenizer = parts["tokenizer"]
        self.encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False) or getattr(
            getattr(model_config, "text_config", None), "is_encoder_decoder", False))
        # A decoder-only model continues the prompt's last token: the shorter prompts are padded in front.
        self.padding_side = tokenizer.padding_side if self.encoder_decoder else "left"
        try:
            processor = build_processor(cls, parts, processor_dict, kwargs)
        except (AttributeError, TypeError, ValueError) as exc:  # files of another layout than the class reads
            raise CapfiltError(f"captioner {name!r}: its {cls.__name__} cannot be built from its files "
                               f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
        self.prompt, text = self._prompt(name, processor)
        self.preprocess = VlmPreprocess(cls, parts, processor_dict, kwargs, text)
        self.tokenizer = tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(name, dtype=TORCH_DTYPES[config.dtype])
        self.model = self.model.to(resolve_device(config.device)).eval()
        self.eos_token_ids = end_of_text_ids(self.model.generation_config, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _refuse_remote_code(self, name: str, config: PretrainedConfig) -> None:
        # Its weights follow that code's layout, which transformers' own class of the same name may not share
        # (Florence-2's original repos and its native conversion differ).
        auto_map = getattr(config, "auto_map", None) or {}
        if any(key.startswith("AutoModel") for key in auto_map):
            native = NATIVE_CONVERSIONS.get(config.model_type)
            instead = f" such as {native}" if native else ""
            raise CapfiltError(f"captioner {name!r} is the original {config.model_type!r} layout, whose model code "
                               f"ships with the checkpoint (config.json auto_map), which capfilt does not run: pass "
                               f"its transformers-native conversion{instead}")

    def _prompt(self, name: str, processor) -> tuple[str, str]:
        """(the prompt as the user gives or capfilt picks it, the text the processor is given for every image)."""
        chat = getattr(processor, "chat_template", None)
        if chat and self.kind not in PREFIXES:
            instruction = INSTRUCTION if self.config.prompt is None else self.config.prompt
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            try:
                text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # a template is a program: it may fail on a turn it did not expect
                raise CapfiltError(f"captioner {name!r}: its chat template fails on a user turn with an image and "
                                   f"an instruction ({type(exc).__name__}: {exc}); pass --prompt with the full "
                                   "text its processor expects") from None
            image_token = getattr(processor, "image_token", None)
            if not image_token or image_token in text:
                return instruction, text
            if self.config.prompt is None:
                raise CapfiltError(f"captioner {name!r}: its chat template places no image in a user turn (a base "
                                   f"model's template?): use its instruction-tuned checkpoint, or pass --prompt "
                                   f"with the full text its processor expects, image placeholder included")
            return self.config.prompt, self.config.prompt  # the template ignores a turn: the prompt is the text
        prompt = PREFIXES.get(self.kind) if self.config.prompt is None else self.config.prompt
        if prompt is None:
            raise CapfiltError(f"captioner {name!r} has no chat template and capfilt knows no captioning prefix for "
                               f"a {self.kind!r} model: pass --prompt with the text its processor expects")
        image_token = getattr(processor, "image_token", None)
        if self.kind in IMAGE_FIRST and image_token and image_token not in prompt:
            return prompt, image_token + prompt
        return prompt, prompt

    def _generation_kwargs(self) -> dict:
        kwargs = self.config.sampling_kwargs()
        if kwargs["do_sample"]:
            kwargs["temperature"] = 1.0  # BLIP's sampling; a checkpoint's generation_config may lower it
        return {**kwargs, "max_new_tokens": self.config.max_new_tokens, "eos_token_id": self.eos_token_ids,
                "pad_token_id": self.pad_token_id}

    @torch.inference_mode()
    def __call__(self, inputs: list[dict[str, torch.Tensor]], seed: int | None = None) -> list[list[str]]:
        batch = collate(inputs, self.pad_token_id, self.padding_side)
        dtype = self.model.dtype
        batch = {k: v.to(self.device, dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                 for k, v in batch.items()}
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(**batch, **self._generation_kwargs())
        if not self.encoder_decoder:  # a decoder-only model echoes the prompt; an encoder-decoder one does not
            out = out[:, batch["input_ids"].shape[1] :]
        # A caption is one line: a chat model may run on past it.
        texts = [t.strip().split("\n")[0].strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        k = self.config.num_captions
        return [texts[i * k : (i + 1) * k] for i in range(len(inputs))]


def end_of_text_ids(generation_config, tokenizer) -> list[int]:
    """Every id that ends a caption: the generation config's (an int or a list) and the tokenizer's own end of
    text. Some generation configs name another token (instructblip-vicuna-7b's says 1, `<s>`, while its text
    ends with `</s>`, 2); with both, generation stops at either."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise CapfiltError("the captioner names no end-of-text token (generation_config.json eos_token_id, or its "
                           "tokenizer's eos_token)")
    return ids

