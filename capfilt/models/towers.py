"""One frozen vision tower for captioner and filter: recognising that two models carry the same one, and
running it once for both."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import PreTrainedModel

# Config entries that say where a tower came from, not what it computes.
_PROVENANCE = ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "_attn_implementation")


def same_vision_tower(first: PreTrainedModel, second: PreTrainedModel) -> bool:
    """Whether two models carry the same vision tower: class, settings and weights (dtype and device too) equal,
    as BLIP-2's stage-1 filter and stage-2 captioner (and capfilt's own pair) share their frozen one."""
    tower, other = first.vision_model, second.vision_model
    if tower is other:
        return True
    if type(tower) is not type(other) or _settings(tower) != _settings(other):
        return False
    mine, theirs = tower.state_dict(), other.state_dict()
    return mine.keys() == theirs.keys() and all(_equal(mine[k], theirs[k]) for k in mine)


@contextlib.contextmanager
def one_tower_pass(first: PreTrainedModel, second: PreTrainedModel):
    """Within: `second` uses `first`'s vision tower (they must be the `same_vision_tower`), which answers a call
    equal to its previous one with the previous output, so the pair runs it once. Restored on exit, so nothing
    outlives the scope: not the wrapper, not the cached tensors."""
    tower, own = first.vision_model, second.vision_model
    tower.forward = _repeat_last(tower.forward)  # an instance attribute, over the class's method
    second.vision_model = tower
    try:
        yield
    finally:
        del tower.forward
        second.vision_model = own


def _settings(tower: PreTrainedModel) -> dict:
    config = getattr(tower, "config", None)
    return {} if config is None else {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE}


def _repeat_last(forward):
    parameters = inspect.signature(forward).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    last = None

    def forward_once(*args, **kwargs):
        nonlocal last
        # HF's generate passes pixel_values by position and spells out defaults; the scorer does neither.
        call = {**defaults, **dict(zip(parameters, args)), **kwargs,
                "_modes": (torch.is_grad_enabled(), torch.is_inference_mode_enabled())}
        if last is not None and _equal(last[0], call):
            return last[1]
        output = forward(*args, **kwargs)
        last = (call, output)
        return output

    return forward_once


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
