"""CapFilt selection: which of an image's scored captions survive (pure functions, no I/O, no models)."""

from __future__ import annotations

from capfilt.data.schema import Candidate
from capfilt.settings import SelectionConfig


def select(candidates: list[Candidate], config: SelectionConfig) -> list[Candidate]:
    """Mark each scored candidate kept or not; return the kept ones, best first (ties: input order, web first).
    An empty result means the image is dropped."""
    passing = [c for c in candidates if c.score is not None and c.score >= config.threshold]
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
