"""CapFilt selection: which of an image's scored captions survive (pure functions, no I/O, no models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from capfilt.data.schema import Candidate
from capfilt.errors import CapfiltError

Policy = Literal["blip", "blip2"]


@dataclass(frozen=True)
class SelectionConfig:
    """`blip`: keep every caption scoring >= threshold (BLIP, salesforce/BLIP #46, #54).
    `blip2`: rank by score and keep the best `keep_top` (BLIP-2 section 3.4), still only those >= threshold."""

    policy: Policy = "blip"
    threshold: float = 0.5
    keep_top: int = 2

    def __post_init__(self):
        if self.policy not in ("blip", "blip2"):
            raise CapfiltError(f"unknown policy {self.policy!r}: choose blip or blip2")
        if not 0.0 <= self.threshold <= 1.0:
            raise CapfiltError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.keep_top < 1:
            raise CapfiltError("--keep-top must be at least 1")


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
