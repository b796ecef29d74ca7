"""`capfilt calibrate`: the filter measured on human-captioned pairs it never trained on, and its P(match)
fitted there.

BLIP keeps a caption when its ITM head says P(match) >= 0.5. That holds for a head trained on enough pairs to
be calibrated on new photos. Fine-tuned on a few hundred pairs, a head memorises them, and its P(match) on
unseen photos sits far from 0.5 (issue 13: 0.03 for true captions, 0.01 for wrong ones, so 0.5 removed all).
Here each image is paired with its own captions (matches) and with other images' captions (mismatches). Each
raw score the filter has (a BLIP filter's ITM margin and ITC similarity, which BLIP-2 ranks its captions by;
CLIP's cosine; SigLIP's logit) gets its ROC AUC, the better one (or the one asked for) is kept, and a
class-balanced logistic fit turns it into P(match), so that BLIP's 0.5 is again the point where a match and a
mismatch are equally likely (for CLIP, whose cosine has no such point, it gives one).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from capfilt.bootstrap.truth import roc_auc
from capfilt.data.files import atomic_write
from capfilt.data.reader import decode_image, expand_specs, read_shard
from capfilt.data.schema import read_candidates
from capfilt.data.text import clean_caption
from capfilt.errors import CapfiltError
from capfilt.models.scorer import Calibration, Scorer, sigmoid
from capfilt.settings import CalibrateConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    image: int  # index into the calibration images
    caption: str
    match: bool


def human_captions(sample) -> list[str]:
    """A sample's human captions: the `human` candidates of its capfilt block, else its txt."""
    human = [c.caption for c in read_candidates(sample.meta) if c.source == "human" and c.caption]
    return human or ([sample.web_caption] if sample.web_caption else [])


def calibration_pairs(captions: list[list[str]], negatives: int, seed: int) -> list[Pair]:
    """Every image with each of its own captions, then with one caption of each of `negatives` other images
    (never a text the image itself has); grouped by image, in image order."""
    rng = random.Random(seed)
    pairs = []
    for i, own in enumerate(captions):
        pairs += [Pair(i, c, True) for c in own]
        drawn = rng.sample(range(len(captions) - 1), min(negatives, len(captions) - 1))
        others = [j if j < i else j + 1 for j in drawn]  # any image but i, without listing them all
        pairs += [Pair(i, c, False) for c in (rng.choice(captions[j]) for j in others) if c not in own]
    return pairs


def fit_logistic(scores: list[float], matches: list[bool], ridge: float = 1e-3) -> tuple[float, float]:
    """(slope, bias) of P(match) = sigmoid(slope * score + bias) by logistic regression in which the matches
    and the mismatches each weigh one half. Newton's method on the standardised score; the small ridge on the
    slope keeps it finite when the pairs are separable."""
    x = torch.tensor(scores, dtype=torch.float64)
    y = torch.tensor(matches, dtype=torch.float64)
    mean, std = x.mean(), x.std().clamp_min(1e-12)
    z = torch.stack([(x - mean) / std, torch.ones_like(x)], dim=1)  # (n, 2)
    weight = torch.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    penalty = torch.diag(torch.tensor([ridge, 0.0], dtype=torch.float64))
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(z @ theta)
        gradient = z.t() @ (weight * (p - y)) + penalty @ theta
        hessian = (z * (weight * p * (1 - p))[:, None]).t() @ z + penalty
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    slope = theta[0] / std
    return float(slope), float(theta[1] - slope * mean)


def read_images(specs: tuple[str, ...], clean_text: bool) -> tuple[list[Image.Image], list[list[str]]]:
    """Decoded images and human captions of every usable sample; the rest are counted and logged, never used."""
    images, captions, skipped = [], [], 0
    for url in expand_specs(specs, outputs=False):
        for sample in read_shard(url):
            own = human_captions(sample) if sample.error is None and sample.image is not None else []
            own = list(dict.fromkeys(clean_caption(c) for c in own)) if clean_text else own
            try:
                image = decode_image(sample.image) if own else None
            except Exception:  # noqa: BLE001  PIL raises more than OSError for a bad file (decompression bombs)
                image = None
            if image is None:
                skipped += 1
                continue
            images.append(image)
            captions.append(own)
    if skipped:
        logger.warning(f"calibration: {skipped} samples skipped (unreadable, or without an image or a caption)")
    if len(images) < 2:
        raise CapfiltError(f"calibration needs at least 2 captioned images, {', '.join(specs)} hold {len(images)}")
    return images, captions


def calibrate(config: CalibrateConfig, scorer: Scorer) -> Calibration:
    """Score the pairs, pick the raw score, fit P(match), write `config.out`, and return the calibration."""
    images, captions = read_images(config.specs, config.clean_text)
    pairs = calibration_pairs(captions, config.negatives, config.seed)
    matches = [p.match for p in pairs]  # pairs come grouped by image, in image order: the order scores come in
    if all(matches):
        raise CapfiltError("no mismatched pairs: every image's captions are the same texts; calibration needs "
                           "images with different captions")
    kinds = tuple(scorer.raw_scores) if config.score == "auto" else (config.score,)
    if not set(kinds) <= set(scorer.raw_scores):
        raise CapfiltError(f"--score {config.score}: filter {scorer.config.model!r} gives "
                           f"{', '.join(scorer.raw_scores)}")
    raw: dict[str, list[float]] = {kind: [] for kind in kinds}
    by_image: list[list[str]] = [[] for _ in images]
    for p in pairs:
        by_image[p.image].append(p.caption)
    for start in tqdm(range(0, len(images), config.batch_size), desc="calibrate", unit="batch"):
        stop = min(start + config.batch_size, len(images))
        pixels = [scorer.preprocess(image) for image in images[start:stop]]
        for kind in kinds:
            raw[kind] += [v for group in scorer.raw(pixels, by_image[start:stop], kind) for v in group]
    auc = {kind: roc_auc([v for v, m in zip(values, matches) if m], [v for v, m in zip(values, matches) if not m])
           for kind, values in raw.items()}
    best = max(kinds, key=lambda kind: auc[kind])
    if not auc[best] > 0.5:  # a fit would invert the filter (or NaN): nothing here to calibrate
        raise CapfiltError(f"the filter does not tell matched from mismatched pairs on {', '.join(config.specs)} "
                           f"(ROC AUC {', '.join(f'{k} {v:.3f}' for k, v in auc.items())}): no calibration written")
    slope, bias = fit_logistic(raw[best], matches)
    probability = [sigmoid(slope * v + bias) for v in raw[best]]
    matched = sum(matches)
    calibration = Calibration(
        score=best, slope=slope, bias=bias, filter=scorer.config.model, specs=list(config.specs),
        clean_text=config.clean_text, auc=auc,
        pairs={"images": len(images), "matched": matched, "mismatched": len(matches) - matched},
        at_half={"matched_kept": sum(p >= 0.5 for p, m in zip(probability, matches) if m) / matched,
                 "mismatched_removed": sum(p < 0.5 for p, m in zip(probability, matches) if not m)
                 / (len(matches) - matched)})
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (calibration.to_json() + "\n").encode())
    return calibration


def describe(calibration: Calibration) -> str:
    """The calibration in two lines, for the CLI and the demo."""
    aucs = ", ".join(f"{kind} {value:.3f}" for kind, value in calibration.auc.items())
    pairs = calibration.pairs
    return (f"held-out ROC AUC on {pairs['images']} images ({pairs['matched']} matched, {pairs['mismatched']} "
            f"mismatched pairs): {aucs}; calibrated: {calibration.score}\n"
            f"at P(match) >= 0.5: {calibration.at_half['matched_kept']:.0%} of matched pairs kept, "
            f"{calibration.at_half['mismatched_removed']:.0%} of mismatched removed")
