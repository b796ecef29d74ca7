"""`capfilt select ... --keys-only FILE`: the kept samples as a list of keys with their chosen caption, from the
scores a run recorded, reading no image and writing no shard.

Rewriting a large corpus to drop part of it costs a copy of what is kept; a training job can instead read the
original shards and skip what the list leaves out (the README's "Selecting" shows it with webdataset and with
`datasets`; mlfoundations/datacomp #11 asked for the same). The list holds exactly the samples a full `capfilt
select` at the same settings writes, each with the caption that select puts in its txt, as long as the input
shards are the ones the run read: unlike a full select, nothing here re-reads them to check.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.bootstrap.fraction import FractionThreshold
from capfilt.bootstrap.outcome import input_location
from capfilt.bootstrap.reselect import recorded_settings, resolve_selection
from capfilt.bootstrap.selection import select
from capfilt.data import reader
from capfilt.data.files import TMP_SUFFIX, publish
from capfilt.data.schema import ERROR, KEYS_META, KEYS_SCHEMA, row_candidates, score_kind, stats_path
from capfilt.errors import CapfiltError
from capfilt.settings import SelectConfig, SelectionConfig

log = logging.getLogger(__name__)


@dataclass
class KeysSummary:
    path: str
    shards: int = 0
    rows: int = 0  # the recorded rows read (one per input sample)
    kept: int = 0
    shards_unrecorded: list[str] = field(default_factory=list)  # not finished in the recorded run: none kept
    fraction: FractionThreshold | None = None  # under --fraction: the threshold worked out (logged when it is)

    def describe(self) -> str:
        text = f"keys: {self.kept:,} of {self.rows:,} samples in {self.shards} shard(s) written to {self.path}"
        if self.shards_unrecorded:
            text += (f"; {len(self.shards_unrecorded)} shard(s) have no recorded scores and give no key: "
                     + ", ".join(self.shards_unrecorded))
        return text


def read_keys_header(path: Path) -> dict[str, Any] | None:
    """The selection a keys file records; None for a parquet file that is not one."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(metadata[KEYS_META]) if KEYS_META in metadata else None


def check_keys_path(path: Path, source: Path, overwrite: bool) -> None:
    """Refuse a path in the recorded run (never altered) or an existing file, unless --overwrite and it is a keys
    file capfilt wrote."""
    if source.resolve() in path.resolve().parents:
        raise CapfiltError(f"--keys-only {path} is inside --from {source}: the recorded run is never altered")
    if path.is_dir():
        raise CapfiltError(f"--keys-only {path} is a directory: give a file name")
    if path.exists() and not (overwrite and read_keys_header(path) is not None):
        raise CapfiltError(f"--keys-only {path} exists" + (" and is not a keys file capfilt wrote" if overwrite else
                                                           ": add --overwrite to replace it"))


def select_keys(config: SelectConfig) -> KeysSummary:
    """`capfilt select --keys-only`: the selection of `reselect` at the same settings, written as a keys file."""
    source, path = Path(config.source), Path(config.keys_only)
    settings = recorded_settings(source)
    check_keys_path(path, source, config.overwrite)
    urls = reader.expand_specs(config.specs)
    selection, fraction = resolve_selection(config, source, settings, urls)
    header = {"selected_from": str(source.resolve()), "selection": dict(selection.__dict__),
              "fraction": fraction.as_dict() if fraction is not None else None,
              "filter": settings["filter"].get("model"), "score_kind": score_kind(settings),
              "caption_rules": settings.get("caption_rules")}
    summary = write_keys(path, source, urls, selection, header)
    summary.fraction = fraction
    return summary


def write_keys(path: Path, source: Path, urls: list[str], selection: SelectionConfig,
               header: dict[str, Any]) -> KeysSummary:
    """Select from the recorded rows of `urls`' shards in `source` and write the kept keys to `path` (atomically:
    the file is whole or absent). `header`: the selection recorded in the file's metadata."""
    summary = KeysSummary(path=str(path))
    schema = KEYS_SCHEMA.with_metadata({KEYS_META: json.dumps(header, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with pq.ParquetWriter(tmp, schema) as out:
            for url in urls:
                name = reader.shard_name(url)
                summary.shards += 1
                if not stats_path(source, name).exists():
                    summary.shards_unrecorded.append(name)
                    continue
                rows = _kept_rows(source / f"{name}.parquet", input_location(url), name, selection, summary)
                out.write_table(pa.Table.from_pylist(rows, schema=schema))
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _kept_rows(parquet: Path, url: str, name: str, selection: SelectionConfig, summary: KeysSummary) -> list[dict]:
    """One shard's kept rows, as a full select decides them: its error rows and rows without complete scores
    (a caption-only run's) are never kept, the rest go through the same `select`."""
    rows = []
    for row in pq.read_table(parquet).to_pylist():
        if not row["key"]:
            continue  # a shard-level error row (a truncated tar...): no sample
        summary.rows += 1
        if row["status"] == ERROR:
            continue
        cands = row_candidates(row)
        if any(c.score is None and c.rule is None for c in cands):
            continue  # unscored: a full select makes it a no_recorded_scores error row
        kept = select(cands, selection)
        if kept:
            summary.kept += 1
            rows.append({"url": url, "shard": name, "key": row["key"], "caption": kept[0].caption,
                         "source": kept[0].source, "score": kept[0].score,
                         "kept_captions": [c.caption for c in kept], "kept_scores": [c.score for c in kept]})
    return rows
