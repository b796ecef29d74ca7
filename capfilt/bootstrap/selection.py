"""CapFilt selection: which of an image's scored captions survive (pure functions, no I/O, no models)."""

from __future__ import annotations

from dataclasses import replace

from capfilt.data.schema import COSINE, PROBABILITY, Candidate, ScoreKind
from capfilt.settings import SelectionConfig

# --threshold when none is given, by the kind of score the filter gives. 0.5: where a match and a mismatch are
# equally likely (BLIP's rule). 0.28: LAION-5B's cut on OpenAI CLIP ViT-B/32 cosines of English pairs, which
# DataComp's LAION-2B filtering baseline repeats; a CLIP score means nothing on another model's scale, so this
# is a starting point to read against `capfilt report`'s sweep, or to replace with --calibration.
DEFAULT_THRESHOLDS: dict[ScoreKind, float] = {PROBABILITY: 0.5, COSINE: 0.28}


def kind_of(scorer) -> ScoreKind:
    """The kind of score a built filter gives (a CLIP model's uncalibrated cosine, else a probability)."""
    return COSINE if scorer.cosine else PROBABILITY


def resolve(config: SelectionConfig, kind: ScoreKind) -> SelectionConfig:
    """The selection with its threshold set: the given one, or the default for the filter's kind of score."""
    if config.threshold is not None:
        return config
    return replace(config, threshold=DEFAULT_THRESHOLDS[kind])


def select(candidates: list[Candidate], config: SelectionConfig) -> list[Candidate]:
    """Mark each scored candidate kept or not; return the kept ones, best first (ties: input order, web first).
    An empty result means the image is dropped. A threshold left None is a probability's (runs `resolve` it
    for their filter first)."""
    threshold = DEFAULT_THRESHOLDS[PROBABILITY] if config.threshold is None else config.threshold
    passing = [c for c in candidates if c.score is not None and c.score >= threshold]
    ranked = sorted(passing, key=lambda c: -c.score)  # sorted() is stable, so ties keep input order
    kept = ranked[: config.keep_top] if config.policy == "blip2" else ranked
    chosen = {id(c) for c in kept}
    for c in candidates:
        c.kept = id(c) in chosen
    return kept


def unique_candidates(web: str | None, synthetic: list[str]) -> list[Candidate]:
    """The web caption (None: the sample has none) then the synthetic ones, empty and repeated texts removed so
    that a caption sampled twice cannot take two of the `keep_top` places."""
    seen: set[str] = set()
    out: list[Candidate] = []
    for text, source in [(web, "web")] + [(s, "synthetic") for s in synthetic]:
        if text and text not in seen:
            seen.add(text)
            out.append(Candidate(text, source))
    return out
