"""`capfilt pretrain`: BLIP-2 Q-Former pre-training, stage 1 (ITC + ITM + ITG on a frozen image encoder) and
stage 2 (LM loss through a frozen LLM), on one process or many (`accelerate launch`, `torchrun`: DDP).

Reads top to bottom: settings, setup (the run directory and resume), build (model, tokenizers, data),
fit (the loop), save. Optimisation follows BLIP-2: AdamW (0.9, 0.98), weight decay 0.05, linear warm-up
then cosine decay, plus gradient clipping.

The run directory (settings, checkpoints, the final model at its root) is `capfilt.train.rundir`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from capfilt.data.files import atomic_write
from capfilt.data.pairs import PairStream, load_pairs
from capfilt.data.reader import expand_specs
from capfilt.errors import CapfiltError
from capfilt.models.loading import ImageTransform, resolve_device
from capfilt.models.qformer import QFormerModel
from capfilt.settings import OptimConfig, PretrainConfig
from capfilt.train.parts import Parts, Tokenize, build, fresh_parameter
from capfilt.train.rundir import (
    METRICS,
    SETTINGS,
    TRAINER_STATE,
    flat_settings,
    latest_checkpoint,
    prepare_run_dir,
    publish_final,
    run_settings,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- settings


@dataclass
class PretrainSummary:
    out: str
    steps: int
    samples: int
    skipped: dict[str, int]
    last: dict[str, float]
    main_process: bool = True  # under a multi-process launch, only the main one should report


# ----------------------------------------------------------------------------------------------- setup


def _accelerator(config: PretrainConfig) -> Accelerator:
    gpu = resolve_device(config.device).type == "cuda"
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, cpu=not gpu,
                       log_with=list(config.log_with) or None, project_dir=config.out)


# ----------------------------------------------------------------------------------------------- build


def shard_batches(config: PretrainConfig, parts: Parts, accelerator: Accelerator,
                  start_step: int) -> Iterator[dict]:
    """Endless tokenized batches for this rank; the seed includes the start step so a resumed run draws anew."""
    urls = expand_specs(config.specs, outputs=False)  # reads them, writes no per-shard output
    tokenize = Tokenize(config.stage, parts.tokenizer, parts.model.config.max_text_length, parts.llm_tokenizer,
                        parts.model.config.prompt)
    stream = PairStream(urls, ImageTransform(parts.image_processor), config.batch_size, resampled=True,
                        shuffle_buffer=config.shuffle_buffer, seed=config.seed, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, epoch=start_step, tokenize=tokenize)
    for batch in load_pairs(stream, config.workers, pin_memory=accelerator.device.type == "cuda"):
        yield {**(batch.inputs or {}), "skipped": batch.skipped}


# ----------------------------------------------------------------------------------------------- run


def pretrain(config: PretrainConfig) -> PretrainSummary:
    """Set up, build, fit, save. Every process of a multi-process launch runs this."""
    accelerator = _accelerator(config)
    out = Path(config.out)
    resume_from = prepare_run_dir(config) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        resume_from = latest_checkpoint(out) if config.resume else None
    parts = build(config, resume_from)
    trainer_state, start_step = None, 0
    if resume_from is not None:
        trainer_state = torch.load(resume_from / TRAINER_STATE, weights_only=False)
        start_step = trainer_state["step"]
        if start_step >= config.optim.steps:
            raise CapfiltError(f"{out} is already at step {start_step}; raise --steps to train further")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / SETTINGS, json.dumps(run_settings(config), indent=2).encode())
    accelerator.init_trackers("capfilt-pretrain", config=flat_settings(run_settings(config)))
    skipped: Counter[str] = Counter()
    samples = 0

    def log(values: dict) -> None:
        nonlocal samples
        samples += values["samples"]
        skipped.update(values.get("skipped", {}))
        accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=values["step"])
        if accelerator.is_main_process:
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(values) + "\n")
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))

    def save(model: QFormerModel, state: dict, step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(parts, model, state, out, step, config.keep_checkpoints)
            if step == config.optim.steps:
                publish_final(out / "checkpoints" / f"step-{step:07d}", out)
        accelerator.wait_for_everyone()

    last = fit(parts.model, lambda start: shard_batches(config, parts, accelerator, start), config.optim,
               accelerator, start_step=start_step, trainer_state=trainer_state, seed=config.seed,
               log_every=config.log_every, save_every=config.save_every, save=save, log=log,
               frozen_cache=config.frozen_cache)
    accelerator.end_training()
    return PretrainSummary(str(out), config.optim.steps, samples, dict(skipped), last, accelerator.is_main_process)


# ----------------------------------------------------------------------------------------------- fit


def _param_groups(model: QFormerModel, weight_decay: float, lr: float, fresh_lr: float | None = None) -> list[dict]:
    """No weight decay on biases, norms and the temperature (1-d or scalar parameters); `fresh_lr` for the
    parameters no BERT init seeds. The LambdaLR schedule scales every group's lr alike. Without `fresh_lr` the
    groups are [decay, no decay], as the trainer states of earlier runs hold them."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            fresh = fresh_lr is not None and fresh_parameter(name)
            groups.setdefault((param.dim() >= 2, fresh), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": fresh_lr if fresh else lr}
            for (decay, fresh), params in ordered]


class FrozenFeatures:
    """The frozen image tower's outputs by sample id, for up to `capacity` images: without augmentation they
    never change, so a corpus seen for many epochs (fine-tuning on a few thousand human pairs) pays for the
    tower once per image instead of once per step. A corpus larger than the capacity just computes the rest."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.store: dict[int, torch.Tensor] = {}

    def __call__(self, model: QFormerModel, pixel_values: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        ids = sample_ids.tolist()
        missing = [i for i, key in enumerate(ids) if key not in self.store]
        fresh = {}
        if missing:
            tokens = model.frozen_tokens(pixel_values[missing])
            for i, row in zip(missing, tokens):
                fresh[ids[i]] = row
                if len(self.store) < self.capacity:
                    self.store[ids[i]] = row.clone()  # not a view that would keep the whole batch alive
        return torch.stack([self.store.get(key, fresh.get(key)) for key in ids])


def step_seed(seed: int, step: int, micro: int) -> int:
    """Seed of one micro-step: fixes dropout and the hard-negative draw independently of process count."""
    return (seed * 1_000_003 + step) * 64 + micro


def fit(model: QFormerModel, batches: Callable[[int], Iterator[dict]], optim: OptimConfig,
        accelerator: Accelerator, *, start_step: int = 0, trainer_state: dict | None = None, seed: int = 0,
        log_every: int = 10, save_every: int | None = None,
        save: Callable[[QFormerModel, dict, int], None] | None = None,
        log: Callable[[dict], None] | None = None, frozen_cache: int = 0) -> dict[str, float]:
    """Train from `start_step` to `optim.steps`. `batches(start_step)` yields this rank's micro-batches
    (keyword arguments of the model, plus an optional "skipped" count dict). `frozen_cache`: keep the frozen
    tower's outputs of up to this many images (by the batches' sample_ids). Returns the last logged values."""
    if accelerator.device.type == "cuda" and accelerator.mixed_precision in ("bf16", "fp16"):
        frozen = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        model.vision_model.to(frozen)  # frozen parts in low precision: half the memory, no grads to keep exact
        if model.has_language_model:
            model.language_model.to(frozen)
    optimizer = torch.optim.AdamW(_param_groups(model, optim.weight_decay, optim.lr, optim.fresh_lr), lr=optim.lr,
                                  betas=optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_factor)
    if trainer_state is not None:
        try:
            optimizer.load_state_dict(trainer_state["optimizer"])
        except ValueError as exc:  # other parameter groups: --fresh-lr given, dropped or changed since
            raise CapfiltError(f"the checkpoint's optimizer state does not fit this run ({exc}): resume with the "
                               "settings it was trained with (--fresh-lr included)") from None
        scheduler.load_state_dict(trainer_state["scheduler"])
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    ddp_model.train()
    cache = FrozenFeatures(frozen_cache) if frozen_cache else None
    source = batches(start_step)
    keys = ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_lm")
    totals, samples, micro_steps, skipped, last = {}, 0, 0, Counter(), {}
    started = time.perf_counter()
    bar = tqdm(total=optim.steps, initial=start_step, desc="pretrain", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start_step, optim.steps):
        for micro in range(optim.grad_accum):
            batch = next(source)
            while "pixel_values" not in batch:  # a batch-less skip report
                skipped.update(batch.pop("skipped", {}))
                batch = next(source)
            skipped.update(batch.pop("skipped", {}))
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            rows = batch["pixel_values"].shape[0]
            if cache is not None and "sample_ids" in batch:
                batch["image_tokens"] = cache(model, batch.pop("pixel_values"), batch["sample_ids"])
            seed_here = step_seed(seed, step, micro)
            torch.manual_seed(seed_here + accelerator.process_index)
            context = accelerator.no_sync(ddp_model) if micro < optim.grad_accum - 1 else contextlib.nullcontext()
            with context:
                out = ddp_model(**batch, **({} if "llm_labels" in batch else {"negatives_seed": seed_here}))
                accelerator.backward(out.loss / optim.grad_accum)
            for key in keys:
                if getattr(out, key, None) is not None:
                    totals[key] = totals.get(key, 0.0) + getattr(out, key).detach().float()
            samples += rows
            micro_steps += 1
        accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % log_every == 0 or done == optim.steps:
            last = _log_values(accelerator, totals, samples, micro_steps, skipped, started, scheduler, done)
            totals, samples, micro_steps, started = {}, 0, 0, time.perf_counter()
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k.startswith("loss")})
            if log is not None:
                log(last)
        if save is not None and (done % (save_every or optim.steps) == 0 or done == optim.steps):
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": done}
            save(accelerator.unwrap_model(ddp_model), state, done)
    bar.close()
    return last


def _log_values(accelerator, totals, samples, micro_steps, skipped, started, scheduler, step) -> dict:
    """Losses averaged over the interval's micro-steps and over the ranks; samples/s of the whole job."""
    names = sorted(totals)
    device = accelerator.device
    stacked = torch.stack([totals[k].to(device) for k in names] + [torch.tensor(float(samples), device=device)])
    reduced = accelerator.reduce(stacked, reduction="sum")
    values = {"step": step, "lr": scheduler.get_last_lr()[0]}
    for i, name in enumerate(names):
        values[name] = reduced[i].item() / (accelerator.num_processes * micro_steps)
    values["samples"] = int(reduced[-1].item())
    values["samples_per_s"] = values["samples"] / max(1e-9, time.perf_counter() - started)
    if skipped:
        values["skipped"] = dict(skipped)
    return values
