"""`capfilt select --fraction F`: the threshold that keeps the best F of an output's images, worked out from the
scores every shard's parquet recorded, in memory that does not grow with the corpus.

What counts: an image that has at least one recorded score (error rows, and images whose every caption failed
a caption rule, have none), by its best caption's score. Under both policies an image is kept exactly when its
best caption passes the threshold (`blip` keeps every caption >= it, `blip2` the best `keep_top` of those), so
keeping the best F of the images is a threshold on that score. DataComp's baselines select this way ("the top
30% by CLIP score") because a score's scale differs between filters and corpora; nothing here assumes [0, 1].

How: pass 1 reads the scores for their count, minimum and maximum; each further pass sorts them into a
fixed-size histogram (BINS bins, with each bin's smallest and largest score) over the range still in question,
and finds the bin where the best ceil(F * n) images end. Binning is monotone, so the images of that bin are
exactly those scoring within [its smallest, its largest]: the next pass histograms only those. It stops when
that bin ends exactly on the target count, holds a single score (ties), or after MAX_PASSES. The threshold is
the smallest score of the last bin, a recorded score, so `kept` is exact: the target, plus only the images
that tie with the threshold or lie within `resolution` (the last bin's width; with BINS = 4096 after three
histogram passes, below (max - min) / 4096^3) of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import CapfiltError

BINS = 4096
MAX_PASSES = 4  # pass 1 (range) and up to 3 histogram passes
BATCH_ROWS = 65536  # parquet rows read at a time: bounds memory per pass, whatever a shard's size


@dataclass(frozen=True)
class FractionThreshold:
    """The threshold that keeps the best `fraction` of `images`, and what it keeps."""

    fraction: float
    images: int  # images with a recorded score: the whole that `fraction` is of
    target: int  # ceil(fraction * images)
    threshold: float  # a recorded score: the images whose best caption scores >= it are kept
    kept: int  # images kept at it: `target`, more only through ties within `resolution`
    resolution: float  # width of the last histogram bin; 0.0: `kept` is the top `target` and their exact ties
    passes: int  # reads of the recorded scores

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        extra = self.kept - self.target
        ties = "" if not extra else (f", {extra} more tying with it" if not self.resolution else
                                     f", {extra} more within {self.resolution:.3g} of it")
        return (f"--fraction {self.fraction:g}: threshold {self.threshold!r} keeps {self.kept:,} of {self.images:,} "
                f"scored images (target {self.target:,}{ties}; {self.passes} passes over the recorded scores)")


def image_scores(parquets: Iterable[Path]) -> Iterator[np.ndarray]:
    """Per image (parquet row), its best recorded score, batch by batch; rows without any score are left out.
    A null or NaN score (a caption a rule dropped, an error row) never counts."""
    for path in parquets:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS,
                                                      columns=["web_score", "synthetic_scores"]):
            best = batch.column(0).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
            synthetic = batch.column(1)
            values = pc.list_flatten(synthetic).to_numpy(zero_copy_only=False).astype(np.float64)
            if len(values):
                np.fmax.at(best, pc.list_parent_indices(synthetic).to_numpy(), values)  # fmax: NaN loses
            yield best[~np.isnan(best)]


def fraction_threshold(parquets: list[Path], fraction: float, bins: int = BINS,
                       max_passes: int = MAX_PASSES) -> FractionThreshold:
    """The threshold keeping the best `fraction` (0 < fraction <= 1) of the images of `parquets` (see the module)."""
    if not 0.0 < fraction <= 1.0:
        raise CapfiltError(f"--fraction must be in (0, 1], got {fraction}")
    n, lo, hi = 0, math.inf, -math.inf
    for scores in image_scores(parquets):
        if len(scores):
            n, lo, hi = n + len(scores), min(lo, float(scores.min())), max(hi, float(scores.max()))
    if n == 0:
        raise CapfiltError("the recorded run holds no scores for these shards: no fraction to keep")
    target = min(n, math.ceil(fraction * n))
    above, passes = 0, 1  # images scoring above the range [lo, hi] still in question
    while True:
        counts, mins, maxs = _histogram(image_scores(parquets), lo, hi, bins)
        passes += 1
        from_top = np.cumsum(counts[::-1])[::-1] + above  # from_top[b]: images scoring in bin b or above
        b = int(np.flatnonzero(from_top >= target).max())
        above_b = int(from_top[b] - counts[b])
        if from_top[b] == target or mins[b] == maxs[b] or passes >= max_passes:
            exact = from_top[b] == target or mins[b] == maxs[b]  # the top `target`, or they and their ties
            return FractionThreshold(fraction=fraction, images=n, target=target, threshold=float(mins[b]),
                                     kept=int(from_top[b]), resolution=0.0 if exact else float(maxs[b] - mins[b]),
                                     passes=passes)
        above, lo, hi = above_b, float(mins[b]), float(maxs[b])


def _histogram(batches: Iterable[np.ndarray], lo: float, hi: float, bins: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, smallest and largest score per bin of the scores within [lo, hi]. The bin index is
    floor((x - lo) / (hi - lo) * bins): each step is monotone in x, so a higher bin holds only higher scores."""
    counts = np.zeros(bins, dtype=np.int64)
    mins, maxs = np.full(bins, np.inf), np.full(bins, -np.inf)
    for scores in batches:
        scores = scores[(scores >= lo) & (scores <= hi)]
        if hi > lo:
            index = np.minimum(np.floor((scores - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
        else:
            index = np.zeros(len(scores), dtype=np.int64)
        counts += np.bincount(index, minlength=bins)
        np.minimum.at(mins, index, scores)
        np.maximum.at(maxs, index, scores)
    return counts, mins, maxs
