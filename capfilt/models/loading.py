"""Loading a captioner or filter checkpoint (Hub id or local directory) with one-line errors for user mistakes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import logging as hf_logging
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from capfilt.errors import CapfiltError
from capfilt.launcher import launcher_local_rank
from capfilt.settings import DTYPES

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # capfilt shows its own progress; a bar per weight file is noise

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))  # the names settings checks


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = launcher_local_rank()
    if device == "cuda" and local_rank is not None:  # one process per GPU
        device = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise CapfiltError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CapfiltError(f"device {device!r} asked for, but no CUDA GPU is visible")
    return resolved


def vision_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype pixel values must have. Not model.dtype: BLIP-2 keeps its Q-Former in fp32 under bf16/fp16."""
    return next(model.vision_model.parameters()).dtype


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is a path the user meant to exist.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


# What users call each model class, with a Hub id they would recognise, for messages (never the class names).
KINDS = {
    "BlipForConditionalGeneration": ("a BLIP captioning checkpoint", "Salesforce/blip-image-captioning-large"),
    "BlipForImageTextRetrieval": ("a BLIP image-text matching (ITM) checkpoint", "Salesforce/blip-itm-large-coco"),
    "Blip2ForConditionalGeneration": ("a BLIP-2 captioning checkpoint", "Salesforce/blip2-opt-2.7b"),
    "Blip2ForImageTextRetrieval": ("a BLIP-2 image-text matching (ITM) checkpoint", "Salesforce/blip2-itm-vit-g"),
    "InstructBlipForConditionalGeneration": ("an InstructBLIP checkpoint", "Salesforce/instructblip-flan-t5-xl"),
    "QFormerModel": ("a capfilt Q-Former", "a `capfilt pretrain` run"),
    "CLIPModel": ("a CLIP checkpoint (OpenAI, LAION, DFN, MetaCLIP)", "openai/clip-vit-base-patch32"),
    "MetaClip2Model": ("a MetaCLIP 2 checkpoint", "facebook/metaclip-2-worldwide-huge-quickgelu"),
    "SiglipModel": ("a SigLIP or fixed-resolution SigLIP 2 checkpoint", "google/siglip-so400m-patch14-384"),
    "Siglip2Model": ("a SigLIP 2 NaFlex checkpoint", "google/siglip2-base-patch16-naflex"),
}
_MODEL_TYPES = {"blip": "a BLIP", "blip-2": "a BLIP-2", "instructblip": "an InstructBLIP", "clip": "a CLIP",
                "siglip": "a SigLIP", "siglip2": "a SigLIP 2", "metaclip_2": "a MetaCLIP 2"}


def _family(model_type: str) -> str:
    return _MODEL_TYPES.get(model_type, f"a {model_type!r}")


def _kind(class_name: str, model_type: str) -> str:
    if class_name in KINDS:
        return KINDS[class_name][0]
    return f"{_family(model_type)} checkpoint for another task"


def _wanted(role: str, classes: dict[str, type[PreTrainedModel]], others: tuple[str, ...] = ()) -> str:
    kinds = [f"{KINDS[c.__name__][0]} such as {KINDS[c.__name__][1]}" for c in classes.values()] + list(others)
    return f"a {role} must be " + ", ".join(kinds[:-1]) + f" or {kinds[-1]}"


def load_model(name: str, role: str, classes: dict[str, type[PreTrainedModel]], device: str, dtype: str,
               others: tuple[str, ...] = ()):
    """Load `name` with the class that `classes` maps its `model_type` to; refuse checkpoints of the wrong head.
    `others`: what else the role accepts, in users' words, for the refusal."""
    config = load_config(name, role)
    cls = classes.get(config.model_type)
    if cls is None:
        raise CapfiltError(f"{role} {name!r} is {_family(config.model_type)} model, which capfilt cannot use as "
                           f"a {role}: {_wanted(role, classes, others)}")
    architectures = getattr(config, "architectures", None) or []
    if architectures and cls.__name__ not in architectures:
        raise CapfiltError(f"{role} {name!r} is {_kind(architectures[0], config.model_type)}, not "
                           f"{_kind(cls.__name__, config.model_type)} "
                           f"such as {KINDS[cls.__name__][1]}")
    model = cls.from_pretrained(name, dtype=TORCH_DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def load_config(name: str, role: str) -> PretrainedConfig:
    if _looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise CapfiltError(f"{role} {name!r}: no such model directory")
    try:
        return AutoConfig.from_pretrained(name)
    except StrictDataclassError as exc:  # a field transformers' config validators refuse (layer_types, ...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        local = os.path.isdir(os.path.expanduser(name))
        where = os.path.join(os.path.expanduser(name), "config.json") if local else f"the config.json of {name}"
        raise CapfiltError(f"{role} {name!r}: transformers refuses {where}: {lines[-1] if lines else exc}") from None
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CapfiltError(f"{role} {name!r} cannot be loaded: {first_line}") from None


def load_tokenizer(name: str, role: str, subfolder: str = ""):
    try:
        return AutoTokenizer.from_pretrained(name, subfolder=subfolder)
    except (OSError, ValueError, TypeError, ImportError) as exc:  # ImportError: SigLIP's needs sentencepiece
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CapfiltError(f"{role} {name!r} has no usable tokenizer: {first_line}") from None


@dataclass(frozen=True)
class ImageTransform:
    """Picklable image preprocessing (runs in DataLoader workers): PIL images -> (B, 3, H, W) float32."""

    processor: BlipImageProcessorPil

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @property
    def signature(self) -> str:
        """Equal signatures mean identical preprocessing, so captioner and filter can share one tensor."""
        return self.processor.to_json_string()


@dataclass(frozen=True)
class PixelPreprocess:
    """The `Preprocess` (see capfilt.data.reader) of a model that takes pixels alone (the BLIP family): one image
    -> `{"pixel_values": (1, 3, H, W)}`. Its image processor treats each image on its own, so a batch stacked
    from these rows is the tensor it would have made from the whole list."""

    transform: ImageTransform

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform([image])}

    @property
    def signature(self) -> str:
        return self.transform.signature


@dataclass(frozen=True)
class ProcessorPreprocess:
    """The `Preprocess` of a model that takes all its image processor gives, as it gives it (SigLIP 2 NaFlex:
    patches at the image's own aspect ratio padded to a fixed count, their mask, the patch grid): one image ->
    those tensors, each (1, ...), so that rows concatenate into a batch."""

    processor: Any

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return dict(self.processor(images=[image], return_tensors="pt"))

    @property
    def signature(self) -> str:
        return self.processor.to_json_string()


def stack_pixels(inputs: list[dict[str, torch.Tensor]] | torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) from B `PixelPreprocess` rows; a single row is used as is (no copy). A (B, 3, H, W) tensor,
    as a caller of the BLIP-family models from Python hands them, is taken as it is."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    rows = [one["pixel_values"] for one in inputs]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


# Towers whose position embeddings fix the input to their `image_size` square (no interpolation).
FIXED_GRID = ("blip_vision_model", "blip_2_vision_model", "instructblip_vision_model", "clip_vision_model",
              "siglip_vision_model", "metaclip_2_vision_model")


def load_image_transform(name: str, vision_config: PretrainedConfig) -> ImageTransform:
    """The checkpoint's own image processor. For a tower of fixed grid (BLIP family, CLIP, SigLIP) it must give
    the `image_size` square the tower takes (BLIP resizes to a square; an older upload's `{"shortest_edge": 384}`
    keeps the aspect ratio and would not fit the position embeddings), so a BLIP processor is made to, and any
    other that does not is refused. BLIP's (bicubic resize, CLIP mean/std) at that size if the checkpoint has
    none."""
    image_size = vision_config.image_size
    square = {"height": image_size, "width": image_size}
    try:
        processor = AutoProcessor.from_pretrained(name)
        image_processor = getattr(processor, "image_processor", processor)
        if not (callable(image_processor) and hasattr(image_processor, "to_json_string")):
            image_processor = None
    except (OSError, ValueError, TypeError):
        image_processor = None
    if image_processor is None:
        return ImageTransform(BlipImageProcessorPil(size=square))
    if vision_config.model_type not in FIXED_GRID:  # DINOv2...: their own crops, interpolated if need be
        return ImageTransform(image_processor)
    settings = image_processor.to_dict()
    size = {k: v for k, v in (settings.get("size") or {}).items() if v is not None}
    if size != square and "Blip" in type(image_processor).__name__:  # BLIP's processors resize to `size` as is
        log.warning("%s: preprocessor_config.json asks for size %s; the vision tower takes %dx%d, so images are "
                    "resized to that square, as BLIP does", name, size, image_size, image_size)
        image_processor = type(image_processor)(**{**settings, "size": square})
    transform = ImageTransform(image_processor)
    shape = tuple(transform([Image.new("RGB", (640, 384))]).shape)  # a landscape photo, as most are
    if shape[1:] != (3, image_size, image_size):
        fix = f'{{"height": {image_size}, "width": {image_size}}}'
        keys = '"size" and "crop_size"' if settings.get("do_center_crop") else '"size"'
        raise CapfiltError(f"{name!r}: its preprocessor_config.json makes {shape[2]}x{shape[3]} images from a "
                           f"640x384 photo, but its vision tower takes {image_size}x{image_size}: set {keys} to "
                           f"{fix} there")
    return transform
