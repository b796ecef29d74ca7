"""`capfilt pretrain`: BLIP-2 Q-Former pre-training, stage 1 (ITC + ITM + ITG on a frozen image encoder) and
stage 2 (LM loss through a frozen LLM), on one process or many (`accelerate launch`, `torchrun`: DDP).

Reads top to bottom: settings, setup (the run directory and resume), build (model, tokenizers, data),
fit (the loop), save. Optimisation follows BLIP-2: AdamW (0.9, 0.98), weight decay 0.05, linear warm-up
then cosine decay, plus gradient clipping.

Run directory:
    capfilt_pretrain.json        the settings (a second run must `--resume` with the same stage)
    metrics.jsonl                one line per logged step: losses, lr, samples/s, skipped samples
    checkpoints/step-NNNNNNN/    model + tokenizers + image processor; trainer_state.pt written last
    config.json, model.safetensors, tokenizer, preprocessor_config.json, llm_tokenizer/
                                 the final model, so the run directory itself is a `from_pretrained`
                                 checkpoint (`--captioner`, `--filter`, `capfilt eval`)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from capfilt.errors import CapfiltError
from capfilt.pairs import PairBatch, PairStream, load_pairs
from capfilt.qformer import (LLM_TOKENIZER, QFormerModel, QFormerShape, attach_language_model, build_stage1,
                             fresh_parameter, qformer_tokenizer, vision_image_processor)
from capfilt.checkpoint import ImageTransform, load_tokenizer, resolve_device
from capfilt.reader import expand_specs

SETTINGS = "capfilt_pretrain.json"
TRAINER_STATE = "trainer_state.pt"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    # Peak lr of the parameters a BERT init leaves fresh (`qformer.fresh_parameter`: cross-attention, queries,
    # ITC/ITM heads...); None: `lr`. At BERT's fine-tuning lr they barely move in a few hundred steps, and ITM
    # stays at its prior (issue 13).
    fresh_lr: float | None = None

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise CapfiltError("--steps and --grad-accum must be >= 1 and --warmup-steps >= 0")
        if self.fresh_lr is not None and self.fresh_lr < 0:
            raise CapfiltError("--fresh-lr must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise CapfiltError(f"need 0 <= --min-lr <= --lr, got {self.min_lr} and {self.lr}")
        if self.max_grad_norm <= 0:
            raise CapfiltError("--max-grad-norm must be positive")

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine decay to min_lr / lr at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.min_lr / self.lr if self.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class PretrainConfig:
    stage: int
    specs: tuple[str, ...]
    out: str
    vision: str | None = None  # stage 1: the frozen image encoder
    tokenizer: str | None = None  # stage 1: the Q-Former's BERT-style tokenizer (default: shape.init_from)
    shape: QFormerShape = field(default_factory=QFormerShape)
    init: str | None = None  # stage 2: a stage-1 run directory
    llm: str | None = None  # stage 2: the frozen causal LLM
    prompt: str = "a picture of "  # stage 2: text between the visual prompt and the caption (loss-free)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32  # per process and micro-step
    mixed_precision: str = "auto"
    device: str = "auto"  # "cpu" keeps a GPU machine's run on the CPU
    save_every: int = 500
    keep_checkpoints: int = 2
    frozen_cache: int = 0  # images whose frozen-tower output is kept across steps (0: none; see FrozenFeatures)
    log_every: int = 10
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    resume: bool = False
    log_with: tuple[str, ...] = ()  # accelerate trackers (tensorboard, wandb, ...)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise CapfiltError(f"--stage must be 1 or 2, got {self.stage}")
        if self.stage == 1 and not self.resume and self.vision is None:
            raise CapfiltError("stage 1 needs --vision (the frozen image encoder)")
        if self.stage == 1 and not self.resume and (self.tokenizer or self.shape.init_from) is None:
            raise CapfiltError("stage 1 needs --tokenizer (a BERT-style tokenizer) or --qformer-init")
        if self.stage == 2 and not self.resume and (self.init is None or self.llm is None):
            raise CapfiltError("stage 2 needs --init (a stage-1 run directory) and --llm (a causal LM)")
        if self.batch_size < 1 or self.save_every < 1 or self.log_every < 1 or self.workers < 0:
            raise CapfiltError("--batch-size, --save-every and --log-every must be >= 1, --workers >= 0")
        if self.keep_checkpoints < 1:
            raise CapfiltError("--keep-checkpoints must be at least 1")
        if self.frozen_cache < 0:
            raise CapfiltError("--frozen-cache must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise CapfiltError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")


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


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose trainer state (written last) exists."""
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def _prepare_out(config: PretrainConfig) -> Path | None:
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


# ----------------------------------------------------------------------------------------------- build


@dataclass
class Tokenize:
    """PairBatch -> the model's keyword arguments. Stage 1: Q-Former tokens cut at max_text_length and padded
    to the batch's longest caption (every pass of the step is over them: padding to the fixed 32 cost a third
    of the step on COCO captions; the model pads across ranks itself), or to max_text_length with
    `fixed_length` (callers that concatenate batches). Stage 2: LLM tokens `prompt + caption + eos`, loss only
    on the caption and eos. Both carry sample_ids, the key of a cache of frozen image features."""

    stage: int
    tokenizer: object
    max_text_length: int
    llm_tokenizer: object = None
    prompt: str = ""
    fixed_length: bool = False

    def __call__(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        if self.stage == 1:
            tokens = self.tokenizer(batch.captions, padding="max_length" if self.fixed_length else "longest",
                                    truncation=True, max_length=self.max_text_length, return_tensors="pt")
            return dict(pixel_values=batch.pixel_values, input_ids=tokens.input_ids,
                        attention_mask=tokens.attention_mask, sample_ids=batch.sample_ids)
        tok = self.llm_tokenizer
        # The caption follows the prompt after one space, tokenized as one text (LAVIS's way), so a byte-level
        # BPE LLM sees "of Ġa" as in its own training, never a lone-space token ("of Ġ a"); the captioner then
        # prompts with the same stripped text.
        prompt_text = self.prompt.rstrip()
        prompt = tok(prompt_text).input_ids
        rows = []
        for caption in batch.captions:
            ids = tok(f"{prompt_text} {caption}" if prompt_text else caption).input_ids
            if ids[: len(prompt)] != prompt:  # a tokenizer that merges across the space: keep the parts apart
                ids = prompt + tok(caption, add_special_tokens=False).input_ids
            rows.append(ids[: len(prompt) + self.max_text_length] + [tok.eos_token_id])
        length = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(prompt) : len(row)] = ids[i, len(prompt) : len(row)]
        return dict(pixel_values=batch.pixel_values, llm_input_ids=ids, llm_attention_mask=mask, llm_labels=labels,
                    sample_ids=batch.sample_ids)


@dataclass
class Parts:
    model: QFormerModel
    tokenizer: object
    llm_tokenizer: object
    image_processor: object


def build(config: PretrainConfig, resume_from: Path | None) -> Parts:
    if resume_from is not None:
        return load_parts(str(resume_from))
    if config.stage == 1:
        tokenizer = qformer_tokenizer(config.tokenizer or config.shape.init_from)
        model = build_stage1(config.vision, tokenizer, config.shape)
        return Parts(model, tokenizer, None, vision_image_processor(config.vision, model.vision_model))
    stage1 = load_parts(config.init)
    if stage1.model.has_language_model:
        raise CapfiltError(f"--init {config.init!r} is already a stage-2 model; give a stage-1 run directory")
    model = attach_language_model(stage1.model, config.llm, config.prompt)
    return Parts(model, stage1.tokenizer, load_tokenizer(config.llm, "LLM"), stage1.image_processor)


def load_parts(path: str) -> Parts:
    from transformers import AutoImageProcessor

    if not (Path(path) / "config.json").is_file():
        raise CapfiltError(f"{path!r} holds no finished model (no config.json)")
    model = QFormerModel.from_pretrained(path)
    llm_tokenizer = load_tokenizer(path, "LLM", subfolder=LLM_TOKENIZER) if model.has_language_model else None
    return Parts(model, load_tokenizer(path, "Q-Former"), llm_tokenizer, AutoImageProcessor.from_pretrained(path))


def save_parts(parts: Parts, model: QFormerModel, path: Path) -> None:
    """A complete `from_pretrained` directory: model, tokenizers, image processor."""
    model.save_pretrained(path)
    parts.tokenizer.save_pretrained(path)
    parts.image_processor.save_pretrained(path)
    if parts.llm_tokenizer is not None:
        parts.llm_tokenizer.save_pretrained(path / LLM_TOKENIZER)


def shard_batches(config: PretrainConfig, parts: Parts, accelerator: Accelerator,
                  start_step: int) -> Iterator[dict]:
    """Endless tokenized batches for this rank; the seed includes the start step so a resumed run draws anew."""
    urls = expand_specs(config.specs)
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
    resume_from = _prepare_out(config) if accelerator.is_main_process else None
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
        (out / SETTINGS).write_text(json.dumps(_settings(config), indent=2))
    accelerator.init_trackers("capfilt-pretrain", config=_flat(_settings(config)))
    skipped: dict[str, int] = {}
    samples = 0

    def log(values: dict) -> None:
        nonlocal samples
        samples += values["samples"]
        _count(skipped, values.get("skipped", {}))
        accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=values["step"])
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(values) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))

    def save(model: QFormerModel, state: dict, step: int) -> None:
        if accelerator.is_main_process:
            _save_checkpoint(parts, model, state, out, step, config.keep_checkpoints)
            if step == config.optim.steps:
                _publish(out / "checkpoints" / f"step-{step:07d}", out)
        accelerator.wait_for_everyone()

    last = fit(parts.model, lambda start: shard_batches(config, parts, accelerator, start), config.optim,
               accelerator, start_step=start_step, trainer_state=trainer_state, seed=config.seed,
               log_every=config.log_every, save_every=config.save_every, save=save, log=log,
               frozen_cache=config.frozen_cache)
    accelerator.end_training()
    return PretrainSummary(str(out), config.optim.steps, samples, skipped, last, accelerator.is_main_process)


def _settings(config: PretrainConfig) -> dict:
    settings = asdict(config)
    settings.pop("resume")
    return settings


def _flat(settings: dict, prefix: str = "") -> dict:
    """Trackers take flat scalar hyper-parameters."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _save_checkpoint(parts: Parts, model: QFormerModel, state: dict, out: Path, step: int, keep: int) -> None:
    """checkpoints/step-N written under a temporary name, renamed when complete; the oldest are pruned."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_parts(parts, model, tmp)
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)


def _publish(checkpoint: Path, out: Path) -> None:
    """The final model goes to the run directory's root, config.json last: without it the root is no model."""
    (out / "config.json").unlink(missing_ok=True)
    for item in sorted(checkpoint.iterdir(), key=lambda p: p.name == "config.json"):
        if item.name == TRAINER_STATE:
            continue
        target = out / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(item, target)
        else:
            shutil.copyfile(item, target.with_name(target.name + ".tmp"))
            os.replace(target.with_name(target.name + ".tmp"), target)


# ----------------------------------------------------------------------------------------------- fit


def _param_groups(model: QFormerModel, weight_decay: float, lr: float, fresh_lr: float | None = None) -> list[dict]:
    """No weight decay on biases, norms and the temperature (1-d or scalar parameters); `fresh_lr` for the
    parameters no BERT init seeds. The LambdaLR schedule scales every group's lr alike."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            fresh = fresh_lr is not None and fresh_parameter(name)
            groups.setdefault((param.dim() >= 2, fresh), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": fresh_lr if fresh else lr}
            for (decay, fresh), params in sorted(groups.items())]


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
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    ddp_model.train()
    cache = FrozenFeatures(frozen_cache) if frozen_cache else None
    source = batches(start_step)
    keys = ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_lm")
    totals, samples, micro_steps, skipped, last = {}, 0, 0, {}, {}
    started = time.perf_counter()
    bar = tqdm(total=optim.steps, initial=start_step, desc="pretrain", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start_step, optim.steps):
        for micro in range(optim.grad_accum):
            batch = next(source)
            while "pixel_values" not in batch:  # a batch-less skip report
                _count(skipped, batch.pop("skipped", {}))
                batch = next(source)
            _count(skipped, batch.pop("skipped", {}))
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


def _count(into: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        into[reason] = into.get(reason, 0) + n


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
