"""Shard writer and output-directory bookkeeping: atomic output shards, per-sample parquet, stats written last.

For an input shard NAME, the output directory gets NAME.tar (kept samples), NAME.parquet (one row per input
sample) and NAME_stats.json. Each is written under a `.tmp` name and renamed; the stats file is renamed last,
so its presence means the shard is complete (img2dataset's resume rule) and anything else is redone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from capfilt.errors import CapfiltError

MANIFEST = "capfilt_run.json"
STATS_SUFFIX = "_stats.json"
TMP_SUFFIX = ".tmp"
CLAIMS = ".claims"  # capfilt.distributor's shard claims, one directory per job attempt
# Fixed member mtime: a shard's bytes then depend only on its contents, so a resumed run equals a fresh one.
TAR_MTIME = 0.0

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
    ]
)
OK, DROPPED, ERROR = "ok", "dropped", "error"


def stats_path(out: Path, shard: str) -> Path:
    return out / f"{shard}{STATS_SUFFIX}"


def _ours(name: str) -> bool:
    return name == MANIFEST or name.endswith((".tar", ".parquet", STATS_SUFFIX, TMP_SUFFIX))


def prepare_output(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create or reopen an output directory. A directory holding a run with the same settings is resumed;
    anything else there is refused unless `overwrite`, which deletes capfilt's files (and only those)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if overwrite:
        for path in out.iterdir():
            if path.is_file() and _ours(path.name):
                path.unlink()
            elif path.name == CLAIMS:
                shutil.rmtree(path, ignore_errors=True)
    else:
        others = [p for p in out.iterdir() if p.name != CLAIMS and not p.name.endswith(TMP_SUFFIX)]
        if manifest.exists():  # also when another process of the job wrote it since this one looked
            previous = json.loads(manifest.read_text()).get("settings", {})
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            if changed:
                raise CapfiltError(
                    f"{out} holds a run with other settings ({', '.join(changed)}): use --overwrite or another --out"
                )
            return
        if others:
            raise CapfiltError(f"{out} is not empty and holds no capfilt run: use --overwrite or another --out")
    # Every process of a job may get here at once; each writes the same bytes through its own temporary file.
    _atomic_write(manifest, json.dumps({"settings": settings}, indent=2).encode(), unique=True)


def _atomic_write(path: Path, data: bytes, unique: bool = False) -> None:
    tmp = path.with_name(path.name + (f".{os.getpid()}" if unique else "") + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ShardStats:
    read: int = 0  # input samples seen (shard-level error rows not included)
    written: int = 0
    dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    web_kept: int = 0
    synthetic_generated: int = 0
    synthetic_kept: int = 0
    captions_scored: int = 0
    oom_halvings: int = 0  # times a batch ran out of GPU memory and was retried in halves

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


class ShardWriter:
    """Writes one output shard. `write_sample` and `add_row` as samples come; `commit` or `abort` once."""

    def __init__(self, out: Path, shard: str):
        self.out, self.shard = out, shard
        self.tar_path = out / f"{shard}.tar"
        self._tar_tmp = out / f"{shard}.tar{TMP_SUFFIX}"
        self._tar = wds.TarWriter(str(self._tar_tmp), encoder=False, mtime=TAR_MTIME)
        self._rows: list[dict[str, Any]] = []
        self.stats = ShardStats()

    def write_sample(self, key: str, image: bytes, image_ext: str, caption: str, meta: dict[str, Any]) -> None:
        """The image bytes go out exactly as they came in; `meta` is the json member."""
        self._tar.write(
            {
                "__key__": key,
                image_ext: image,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            }
        )

    def add_row(self, **row: Any) -> None:
        self._rows.append({name: row.get(name) for name in ROW_SCHEMA.names})

    def commit(self, extra_stats: dict[str, Any]) -> dict[str, Any]:
        self._tar.close()
        os.replace(self._tar_tmp, self.tar_path)
        table = pa.Table.from_pylist(self._rows, schema=ROW_SCHEMA)
        parquet_tmp = self.out / f"{self.shard}.parquet{TMP_SUFFIX}"
        pq.write_table(table, parquet_tmp)
        os.replace(parquet_tmp, self.out / f"{self.shard}.parquet")
        stats = {"shard": self.shard, **self.stats.__dict__, **extra_stats}
        _atomic_write(stats_path(self.out, self.shard), json.dumps(stats, indent=2).encode())
        return stats

    def abort(self) -> None:
        self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
