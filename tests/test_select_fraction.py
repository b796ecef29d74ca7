"""`capfilt select --fraction F`: the threshold worked out in fixed memory keeps the same images as a direct
sort of every shard's recorded scores, whatever the scores' scale; it is printed and recorded."""

import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli, demo_samples, read_json, write_tar

from capfilt.bootstrap.fraction import fraction_threshold
from capfilt.data.schema import MANIFEST, ROW_SCHEMA


def write_scores(path: Path, rows: list[tuple]) -> Path:
    """A parquet of recorded rows: (web_score, synthetic_scores) each; None where nothing was scored."""
    table = [{"key": f"k{i}", "status": "ok" if web is not None or syn else "error", "web_caption": "w",
              "web_score": web, "synthetic_captions": ["s"] * len(syn or []), "synthetic_scores": syn}
             for i, (web, syn) in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(table, schema=ROW_SCHEMA), path)
    return path


def direct(paths: list[Path]) -> np.ndarray:
    """Every image's best score by reading whole tables: the reference."""
    best = []
    for p in paths:
        for r in pq.read_table(p).to_pylist():
            scores = [s for s in [r["web_score"], *(r["synthetic_scores"] or [])] if s is not None]
            if scores:
                best.append(max(scores))
    return np.sort(np.array(best))[::-1]


@pytest.fixture
def cosine_shards(tmp_path) -> list[Path]:
    """Three shards of cosine-like scores (negative ones too), with unscored rows and rule-dropped captions."""
    rng = random.Random(0)
    paths = []
    for shard in range(3):
        rows = []
        for _ in range(300 + 50 * shard):
            web = rng.uniform(-0.3, 0.45)
            syn = [rng.uniform(-0.3, 0.45) if rng.random() > 0.2 else None for _ in range(rng.randint(0, 3))]
            rows.append((web if rng.random() > 0.1 else None, syn))
        rows += [(None, None), (None, [None, None])]  # an error row; an image whose every caption a rule dropped
        paths.append(write_scores(tmp_path / f"s{shard}.parquet", rows))
    return paths


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_the_threshold_keeps_the_same_images_as_a_direct_sort(cosine_shards, fraction):
    best = direct(cosine_shards)
    got = fraction_threshold(cosine_shards, fraction)
    target = math.ceil(fraction * len(best))
    assert got.images == len(best) and got.target == target
    assert got.threshold == best[target - 1]  # the target-th best score itself
    assert got.kept == target == int((best >= got.threshold).sum()) and got.resolution == 0.0


def test_ties_at_the_threshold_are_all_kept_and_said(tmp_path):
    path = write_scores(tmp_path / "t.parquet", [(0.9, None)] * 3 + [(0.5, [0.2])] * 10 + [(0.1, None)] * 7)
    got = fraction_threshold([path], 0.25)  # target 5: 3 at 0.9, then 2 of the 10 tying at 0.5
    assert (got.target, got.threshold, got.kept, got.resolution) == (5, 0.5, 13, 0.0)
    assert "8 more tying with it" in got.describe()
    same = write_scores(tmp_path / "same.parquet", [(0.7, None)] * 4)
    assert fraction_threshold([same], 0.5).kept == 4


def test_a_coarse_histogram_states_its_error(cosine_shards):
    best = direct(cosine_shards)
    got = fraction_threshold(cosine_shards, 0.3, bins=4, max_passes=2)  # one histogram pass of 4 bins
    exact = best[got.target - 1]
    assert got.kept == int((best >= got.threshold).sum()) >= got.target  # kept is exact at the threshold
    assert got.threshold <= exact <= got.threshold + got.resolution  # within one bin of the exact score
    assert got.resolution > 0 and "more within" in got.describe()


def test_no_scores_is_a_user_error(tmp_path):
    from capfilt.errors import CapfiltError

    with pytest.raises(CapfiltError, match="no scores"):
        fraction_threshold([write_scores(tmp_path / "e.parquet", [(None, None)])], 0.5)


# ----------------------------------------------------------------------------------------------- the command


@pytest.fixture
def recorded(tmp_path, tiny_models) -> tuple[Path, Path]:
    """Input shards (3, of real photos) and a filter run's output over them at --threshold 0.5."""
    shards = tmp_path / "in"
    shards.mkdir()
    samples = demo_samples(21)
    for i in range(3):
        write_tar(shards / f"part-{i:05d}.tar", samples[7 * i: 7 * (i + 1)])
    out = tmp_path / "recorded"
    result = cli("filter", shards, "--out", out, "--filter", tiny_models["blip_itm"], "--workers", 0, "-q")
    assert result.exit_code == 0, result.output
    return shards, out


def kept_keys(out: Path) -> set[str]:
    return {r["key"] for p in out.glob("*.parquet") for r in pq.read_table(p).to_pylist() if r["status"] == "ok"}


def test_select_fraction_keeps_the_best_images_of_every_shard(recorded, tmp_path):
    shards, source = recorded
    rows = [r for p in sorted(source.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    ranked = sorted(rows, key=lambda r: -r["web_score"])  # one caption per image here
    for fraction in (0.3, 0.6):
        out = tmp_path / f"sel{fraction}"
        result = cli("select", shards, "--from", source, "--out", out, "--fraction", fraction, "-q")
        assert result.exit_code == 0, result.output
        target = math.ceil(fraction * len(rows))
        assert kept_keys(out) == {r["key"] for r in ranked[:target]}
        threshold = ranked[target - 1]["web_score"]
        manifest = read_json(out / MANIFEST)["settings"]
        assert manifest["selection"]["threshold"] == threshold
        assert manifest["fraction"]["kept"] == target and manifest["fraction"]["images"] == len(rows)
        assert f"threshold {threshold!r} keeps {target} of {len(rows)} scored images" in result.output
        again = cli("select", shards, "--from", source, "--out", out, "--fraction", fraction, "-q")
        assert again.exit_code == 0 and "0 shards done, 3 already done" in again.output
        page = out / "report.html"
        assert cli("report", out, "--samples", 0).exit_code == 0
        html = page.read_text()
        assert f"worked out for --fraction {fraction}: the best {target} of {len(rows)} scored images" in html
        assert f"{threshold} (run: --fraction {fraction})" in html  # the sweep table's row of the run


def test_fraction_and_threshold_exclude_each_other(recorded, tmp_path):
    shards, source = recorded
    both = cli("select", shards, "--from", source, "--out", tmp_path / "x", "--fraction", 0.3, "--threshold", 0.5)
    assert both.exit_code == 2 and "not both" in both.output
    bad = cli("select", shards, "--from", source, "--out", tmp_path / "x", "--fraction", 1.5)
    assert bad.exit_code == 2 and "(0, 1]" in bad.output
