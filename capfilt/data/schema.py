"""The output format, owned here: the directory's file names and manifest version, the parquet row schema,
statuses and reason codes, and the `capfilt` json block (written into each kept sample, read back from it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from capfilt.data.files import TMP_SUFFIX, is_temporary_of

# 1: manifests without "format" (before 2026-12-02; the oldest also without "shards"). 2: the manifest carries
# this number and names every shard a run may write. 3: caption rules, the parquet's `web_rule` and
# `synthetic_rules` columns (a score is null where a rule dropped the caption); a format-2 shard reads as one
# whose captions all passed. A reader refuses a newer format than its own.
FORMAT_VERSION = 3

MANIFEST = "capfilt_run.json"
STATS_SUFFIX = "_stats.json"
CLAIMS = ".claims"  # capfilt.bootstrap.claims's shard claims and their holders, shared by every job on the output
# Fixed member mtime: a shard's bytes then depend only on its contents, so a resumed run equals a fresh one.
TAR_MTIME = 0.0

OK, DROPPED, ERROR = "ok", "dropped", "error"

# Reason codes a user sees in the parquet `reason` column and in the stats.
NO_IMAGE = "no_image"
CORRUPT_IMAGE = "corrupt_image"
# The image decodes, but a model's own processor refuses it (e.g. Qwen2-VL's: an aspect ratio over 200).
IMAGE_REJECTED = "image_rejected"
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
BAD_JSON = "bad_json"
EMPTY_TAR = "empty_tar"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_TAR = "unreadable_tar"
DUPLICATE_KEY = "duplicate_key"
# A member over its size limit (--max-image-bytes, --max-caption-bytes, --max-json-bytes): skipped unread.
IMAGE_TOO_LARGE = "image_too_large"
CAPTION_TOO_LONG = "caption_too_long"
JSON_TOO_LARGE = "json_too_large"
# `capfilt select`: the run it selects from holds no usable scores for this sample (detail says why).
NO_RECORDED_SCORES = "no_recorded_scores"
# A dropped row: no caption of the image passed the filter.
ALL_BELOW_THRESHOLD = "all_captions_below_threshold"
# A dropped row: every caption of the image failed a caption rule, so none was scored.
ALL_FAILED_RULES = "all_captions_failed_rules"

# Caption rules (capfilt.data.caption_rules), checked in this order; a caption gets the first it fails, in the
# parquet's `web_rule` / `synthetic_rules` columns and its json candidate's `rule`.
TOO_FEW_WORDS = "too_few_words"
TOO_LITTLE_TEXT = "too_little_text"
MARKUP_OR_CODE = "markup_or_code"
REPEATED_NGRAMS = "repeated_ngrams"
UNFINISHED_SENTENCE = "unfinished_sentence"
CAPTION_RULES = (TOO_FEW_WORDS, TOO_LITTLE_TEXT, MARKUP_OR_CODE, REPEATED_NGRAMS, UNFINISHED_SENTENCE)

# What a filter's scores are. A probability: P(match), from an ITM head, SigLIP's sigmoid or a calibration, where
# 0.5 means a match and a mismatch are equally likely. A cosine: a CLIP model's image-text cosine similarity (the
# DataComp "CLIP score"), in [-1, 1] on a scale of its own, which each CLIP model sets differently.
ScoreKind = Literal["probability", "cosine"]
PROBABILITY: ScoreKind = "probability"
COSINE: ScoreKind = "cosine"
SCORE_LABELS = {PROBABILITY: "P(match)", COSINE: "cosine similarity (CLIP score)"}


def score_kind(settings: dict[str, Any]) -> ScoreKind:
    """The kind of score a run's manifest settings record. No key: a probability, as every run wrote before
    cosine filters existed (so those outputs still resume)."""
    return (settings.get("filter") or {}).get("score_kind", PROBABILITY)

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),  # ok | dropped | error
        ("reason", pa.string()),  # reason code for dropped/error rows
        ("detail", pa.string()),  # the exception or explanation behind the reason
        ("web_caption", pa.string()),
        ("web_score", pa.float64()),
        ("synthetic_captions", pa.list_(pa.string())),
        ("synthetic_scores", pa.list_(pa.float64())),
        ("kept_captions", pa.list_(pa.string())),
        ("web_rule", pa.string()),  # the caption rule the web caption failed (then unscored); null: passed
        ("synthetic_rules", pa.list_(pa.string())),  # the same per synthetic caption, aligned with its scores
    ]
)


MAX_DETAIL = 1000  # characters of an exception kept in `detail`: a message may quote the input at length

# What differs between two runs over the same input and so never enters an output: the address in an object's
# repr (`<_io.BytesIO object at 0x7f1fe47b4f90>`) and paths of temporary files (per process, per run).
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# A temporary path: one of capfilt's `.tmp` names, or one Python's tempfile drew (`/tmp/tmpk3j_x8ab/...`).
_TEMP_PATH = re.compile(r"[^\s'\"]*(?:\.tmp\b|/tmp[a-z0-9_]{8}(?=/|\b))[^\s'\":,;]*")


def error_detail(exc: BaseException) -> str:
    """An exception as a row's `detail`: its type and message on one line, without anything that would differ
    between two runs over the same bytes (object addresses, temporary paths), so outputs stay byte-identical."""
    message = _TEMP_PATH.sub("<temporary file>", _ADDRESS.sub("", " ".join(str(exc).split())))
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


# `capfilt select --keys-only FILE`: one row per kept image, in shard then input order, for a training job that
# reads only these samples from the original shards (README, "Selecting"). The schema's metadata holds KEYS_META:
# json of the selection that chose them (source run, policy, threshold, fraction).
KEYS_SCHEMA = pa.schema(
    [
        ("url", pa.string()),  # the input shard as the run read it (local paths absolute): webdataset's __url__
        ("shard", pa.string()),  # its name, as in the output's NAME.parquet
        ("key", pa.string()),  # the sample's __key__ in that shard
        ("caption", pa.string()),  # the caption a full `select` writes as its txt: the best kept one
        ("source", pa.string()),  # web or synthetic
        ("score", pa.float64()),  # its recorded score
        ("kept_captions", pa.list_(pa.string())),  # every kept caption, best first
        ("kept_scores", pa.list_(pa.float64())),
    ]
)
KEYS_META = b"capfilt"


def stats_path(out: Path, shard: str) -> Path:
    return out / f"{shard}{STATS_SUFFIX}"


def shard_files(shard: str) -> list[str]:
    """The names capfilt writes for a shard: its three files, then their temporary names of before temporary
    names were per process (`is_shard_temporary` knows both kinds)."""
    names = [f"{shard}.tar", f"{shard}.parquet", f"{shard}{STATS_SUFFIX}"]
    return names + [name + TMP_SUFFIX for name in names]


def is_shard_temporary(name: str, shard: str) -> bool:
    """Whether file name `name` is a temporary file of one of `shard`'s files, any process's."""
    return any(is_temporary_of(name, final) for final in shard_files(shard)[:3])


_SHARD_FILE = re.compile(r"^(?P<shard>.+?)(?:\.tar|\.parquet|%s)(?:\.[0-9]+-[0-9a-f]+)?(?:%s)?$"
                         % (re.escape(STATS_SUFFIX), re.escape(TMP_SUFFIX)))


def shard_of(name: str) -> str | None:
    """The shard whose file (or temporary file) `name` is; None for any other name."""
    match = _SHARD_FILE.match(name)
    return match["shard"] if match else None


@dataclass
class Candidate:
    """One caption of an image. `score` is the filter's (P(match), or a CLIP cosine: `ScoreKind`); `kept` is set
    by the selection. `rule`: the caption rule it failed (a reason code of CAPTION_RULES), so it was never scored
    and is never kept."""

    caption: str
    source: Literal["web", "synthetic", "human"]  # human: an annotator's caption (the demo's training shards)
    score: float | None = None
    kept: bool | None = None
    rule: str | None = None


def capfilt_block(candidates: list[Candidate], captioner: str | None, filter: str | None,
                  selection: dict[str, Any] | None, kind: ScoreKind = PROBABILITY) -> dict[str, Any]:
    """The json `capfilt` block of a written sample: every candidate with its source, score and verdict, the
    models that made and judged them, and the selection (policy, threshold, keep_top for blip2) when judged;
    `score_kind` when the scores are not probabilities (absent: P(match), as before cosine filters existed)."""
    block: dict[str, Any] = {
        "candidates": [{"caption": c.caption, "source": c.source, "score": c.score, "kept": c.kept}
                       | ({"rule": c.rule} if c.rule is not None else {}) for c in candidates],
        "captioner": captioner,
        "filter": filter,
    }
    if filter is not None and selection is not None:
        block.update(policy=selection["policy"], threshold=selection["threshold"])
        if selection["policy"] == "blip2":
            block["keep_top"] = selection["keep_top"]
        if kind != PROBABILITY:
            block["score_kind"] = kind
    return block


def read_block(meta: dict[str, Any]) -> dict[str, Any]:
    """A sample json's `capfilt` block ({} for a sample no capfilt run wrote)."""
    block = meta.get("capfilt")
    return block if isinstance(block, dict) else {}


def read_candidates(meta: dict[str, Any]) -> list[Candidate]:
    """The candidates a capfilt run recorded in a sample's json, in order ([] for any other sample)."""
    return [Candidate(c["caption"], c.get("source"), c.get("score"), c.get("kept"), c.get("rule"))
            for c in read_block(meta).get("candidates") or []]


def row_candidates(row: dict[str, Any]) -> list[Candidate]:
    """A parquet row's candidates read back, web first: captions, recorded scores and rules (an older format's
    row has no rule columns: its captions all passed)."""
    web = [Candidate(row["web_caption"], "web", row["web_score"], rule=row.get("web_rule"))] \
        if row["web_caption"] is not None else []
    synthetic = row["synthetic_captions"] or []
    scores = row["synthetic_scores"] or [None] * len(synthetic)
    rules = row.get("synthetic_rules") or [None] * len(synthetic)
    return web + [Candidate(c, "synthetic", s, rule=r) for c, s, r in zip(synthetic, scores, rules)]


def recorded_kept(meta: dict[str, Any]) -> list[str] | None:
    """The captions a capfilt run's verdicts kept for a sample; None when its json records no verdicts."""
    candidates = read_block(meta).get("candidates") or []
    if not any("kept" in c for c in candidates):
        return None
    return [c["caption"] for c in candidates if c.get("kept")]
