"""capfilt: corpus-scale BLIP/BLIP-2 CapFilt over WebDataset shards.

The front door: each step of the loop is one library call, with its config from `capfilt.settings`::

    from capfilt import load_captioner, Scorer, run, pretrain, evaluate
    from capfilt.settings import CaptionerConfig, ScorerConfig, RunConfig

Names are imported on first use, so `import capfilt` (and the CLI's --help) does not import torch.
"""

from capfilt.errors import CapfiltError

__version__ = "0.1.0"

_FRONT_DOOR = {
    "run": "capfilt.bootstrap.pipeline",
    "run_job": "capfilt.bootstrap.launch",
    "reselect": "capfilt.bootstrap.reselect",
    "calibrate": "capfilt.bootstrap.calibrate",
    "Captioner": "capfilt.models.captioner",
    "load_captioner": "capfilt.models.captioner",  # a BLIP-family Captioner, or a VLM captioner
    "Scorer": "capfilt.models.scorer",
    "pretrain": "capfilt.train.pretrain",
    "evaluate": "capfilt.train.evaluate",
    "export": "capfilt.train.export",
}
__all__ = ["CapfiltError", *_FRONT_DOOR]


def __getattr__(name: str):
    if name not in _FRONT_DOOR:
        raise AttributeError(f"module 'capfilt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_FRONT_DOOR[name]), "run" if name == "evaluate" else name)
    globals()[name] = value
    return value
