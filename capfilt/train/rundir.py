"""A pre-training run directory: its settings file and resume rule, checkpoints written whole or not at all,
and the final model published at its root, so the directory itself is a `from_pretrained` checkpoint.

    capfilt_pretrain.json        the settings (a second run must `--resume` with the same stage)
    metrics.jsonl                one line per logged step: losses, lr, samples/s, skipped samples
    checkpoints/step-NNNNNNN/    model + tokenizers + image processor; trainer_state.pt written last
    config.json, model.safetensors, tokenizer, preprocessor_config.json, llm_tokenizer/
                                 the final model (`--captioner`, `--filter`, `capfilt eval`)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from capfilt.data.files import publish, temporary
from capfilt.errors import CapfiltError
from capfilt.models.qformer import QFormerModel
from capfilt.train.parts import Parts, save_parts

SETTINGS = "capfilt_pretrain.json"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose trainer state (written last) exists."""
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def prepare_run_dir(config) -> Path | None:
    """Check the run directory against the settings; returns the checkpoint to resume from, if any."""
    out = Path(config.out)
    settings_file = out / SETTINGS
    if settings_file.is_file():
        saved = json.loads(settings_file.read_text())
        if not config.resume:
            raise CapfiltError(f"{out} already holds a pre-training run: pass --resume to continue it, or a new --out")
        if saved["stage"] != config.stage:
            raise CapfiltError(f"{out} holds a stage-{saved['stage']} run; cannot resume it as stage {config.stage}")
        return latest_checkpoint(out)
    if config.resume:
        raise CapfiltError(f"--resume: {out} holds no pre-training run")
    if out.exists() and any(out.iterdir()):
        raise CapfiltError(f"{out} exists and is not empty: choose a new --out")
    return None


def run_settings(config) -> dict:
    settings = asdict(config)
    settings.pop("resume")
    return settings


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """Trackers take flat scalar hyper-parameters."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def save_checkpoint(parts: Parts, model: QFormerModel, state: dict, out: Path, step: int, keep: int) -> None:
    """checkpoints/step-N written under a temporary name, renamed when complete; the oldest are pruned."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_parts(parts, model, tmp)
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    publish(tmp, final)
    for old in sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)


def publish_final(checkpoint: Path, out: Path) -> None:
    """The final model goes to the run directory's root, config.json last: without it the root is no model."""
    (out / "config.json").unlink(missing_ok=True)
    for item in sorted(checkpoint.iterdir(), key=lambda p: p.name == "config.json"):
        if item.name == TRAINER_STATE:
            continue
        target, tmp = out / item.name, temporary(out / item.name)
        if item.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(item, tmp)
            shutil.rmtree(target, ignore_errors=True)
        else:
            shutil.copyfile(item, tmp)
        publish(tmp, target)
