"""Shard writer and output-directory bookkeeping: atomic output shards, per-sample parquet, stats written last.

For an input shard NAME, the output directory gets NAME.tar (kept samples; none when nothing is kept),
NAME.parquet (one row per input sample) and NAME_stats.json. Each is written under a temporary name of this
process's own (several jobs may share the directory), made durable and renamed; the stats file comes last, so
its presence means the shard is complete (img2dataset's resume rule) and anything else is redone. The manifest
names every shard a run may write: the only files `--overwrite` deletes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from capfilt.data.files import TMP_SUFFIX, atomic_write, publish, temporary
from capfilt.data.schema import (
    CLAIMS,
    FORMAT_VERSION,
    MANIFEST,
    ROW_SCHEMA,
    STATS_SUFFIX,
    TAR_MTIME,
    shard_files,
    shard_of,
    stats_path,
)
from capfilt.errors import CapfiltError

OVERWRITE_ALONE = ("--overwrite needs a single process (several would delete each other's new files): run it "
                   "once without a launcher or --processes, or give a new --out")


def recorded_shards(out: Path) -> list[str] | None:
    """The shards the manifest says runs in `out` may have written; None when `out` holds no capfilt run."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    if manifest.get("format", 1) > FORMAT_VERSION:
        raise CapfiltError(f"{out} holds a run of output format {manifest['format']}, newer than this capfilt's "
                           f"({FORMAT_VERSION}): upgrade capfilt to read or resume it")
    if "shards" not in manifest:  # written before the manifest named its shards: those with a stats file
        return sorted(p.name[: -len(STATS_SUFFIX)] for p in out.glob(f"*{STATS_SUFFIX}"))
    return manifest["shards"]


def check_apart_from_inputs(out: Path, inputs: list[Path]) -> None:
    """Refuse an --out that is, or holds, the directory of an input shard: outputs would mix with the inputs."""
    target = out.resolve()
    for path in inputs:
        folder = path.resolve().parent
        if folder == target or target in folder.parents:
            raise CapfiltError(f"--out {out} holds the input shard {path}: give the output a directory of its own")


def prepare_output(out: Path, settings: dict[str, Any], overwrite: bool, shards: list[str]) -> None:
    """Create or reopen an output directory for a run over `shards`. A directory holding a run with the same
    settings is resumed; one with other settings is refused unless `overwrite`, which deletes the files that run
    wrote (those its manifest names, and only those). Anything else is refused, so that no file of the user's is
    deleted or replaced."""
    out.mkdir(parents=True, exist_ok=True)
    # Listed before the manifest is read: a peer may write it (then its first shards) in between, and this
    # process then joins its run instead of calling the directory foreign.
    listing = {p.name for p in out.iterdir()}
    recorded = recorded_shards(out)
    if recorded is not None and not overwrite:
        previous = json.loads((out / MANIFEST).read_text()).get("settings", {})
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise CapfiltError(
                f"{out} holds a run with other settings ({', '.join(changed)}): rerun with its settings to resume "
                f"it, choose another --out, or add --overwrite to delete that run's {len(recorded)} shard(s) "
                "(their .tar, .parquet and _stats.json files) and start again"
            )
    elif recorded is None and any(name != CLAIMS and not name.endswith(TMP_SUFFIX) for name in listing):
        raise CapfiltError(f"{out} is not empty and holds no capfilt run: choose another --out "
                           "(--overwrite deletes only the files of a capfilt run)")
    new = sorted(set(shards) - set(recorded or []))
    foreign = [name for shard in new for name in shard_files(shard)[:3] if name in listing]
    if foreign:
        raise CapfiltError(f"{out} holds {foreign[0]}, which no capfilt run there wrote: choose another --out")
    if recorded is not None and overwrite:
        _delete_run(out, recorded)
        recorded = None
    if new or recorded is None:
        # Every process of a job may get here at once; each writes the same bytes through its own temporary file.
        manifest = {"format": FORMAT_VERSION, "settings": settings,
                    "shards": sorted(set(shards) | set(recorded or []))}
        atomic_write(out / MANIFEST, json.dumps(manifest, indent=2).encode(), unique=True)


def _delete_run(out: Path, shards: list[str]) -> None:
    names, ours = {MANIFEST} | {name for shard in shards for name in shard_files(shard)}, set(shards)
    for path in out.iterdir():
        temporary_file = path.name.endswith(TMP_SUFFIX) and (path.name.startswith(MANIFEST + ".")
                                                             or shard_of(path.name) in ours)
        if path.is_file() and (path.name in names or temporary_file):
            path.unlink()
    shutil.rmtree(out / CLAIMS, ignore_errors=True)


def unfinished_shards(out: Path, shards: list[str], done: set[str]) -> list[str]:
    """The shards of `shards` not in `done` that some process started: any file of theirs in `out`, a per-process
    temporary one included."""
    started = {shard_of(p.name) for p in out.iterdir()}
    return sorted(s for s in shards if s not in done and s in started)


def all_done(out: Path) -> bool:
    """Every shard the output's runs took on has its stats file."""
    shards = recorded_shards(out)
    return shards is not None and all(stats_path(out, shard).exists() for shard in shards)


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
    captions_truncated: int = 0  # scored captions longer than the filter reads, cut to its text length
    oom_halvings: int = 0  # times a batch ran out of GPU memory and was retried in halves

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


class ShardWriter:
    """Writes one output shard. `write_sample` and `add_row` as samples come; `commit` or `abort` once.
    `guard`, when given, is asked right before each file is published (and before a stale tar is removed): a
    writer that no longer holds its shard (`capfilt.bootstrap.claims`) publishes nothing more."""

    def __init__(self, out: Path, shard: str, guard: Callable[[], bool] | None = None):
        self.out, self.shard, self.guard = out, shard, guard
        self.tar_path = out / f"{shard}.tar"
        self._tar_tmp = temporary(self.tar_path, unique=True)
        self._parquet_tmp: Path | None = None
        self._tar: wds.TarWriter | None = None  # opened by the first kept sample: a shard keeping none has no tar
        self._rows: list[dict[str, Any]] = []
        self.stats = ShardStats()

    def write_sample(self, key: str, image: bytes, image_ext: str, caption: str, meta: dict[str, Any]) -> None:
        """The image bytes go out exactly as they came in; `meta` is the json member."""
        if self._tar is None:
            self._tar = wds.TarWriter(str(self._tar_tmp), encoder=False, mtime=TAR_MTIME)
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

    def commit(self, extra_stats: dict[str, Any]) -> dict[str, Any] | None:
        """Publish the shard, stats file last; its stats. None when `guard` refused: this writer lost its shard
        to another process (which writes the same bytes), and its temporary files are gone."""
        tar, self._tar = self._tar, None
        if tar is not None:
            tar.close()
        self._parquet_tmp = temporary(self.out / f"{self.shard}.parquet", unique=True)
        pq.write_table(pa.Table.from_pylist(self._rows, schema=ROW_SCHEMA), self._parquet_tmp)
        stats = {"shard": self.shard, **self.stats.__dict__, **extra_stats}
        try:
            if tar is not None:
                published = publish(self._tar_tmp, self.tar_path, self.guard)
            elif published := self.guard is None or self.guard():
                # No empty tar (readers such as `datasets` fail on one), and none left by an earlier attempt.
                self.tar_path.unlink(missing_ok=True)
            published = published and publish(self._parquet_tmp, self.out / f"{self.shard}.parquet", self.guard)
            # The parquet's directory sync covered the unlink too; the stats file vouches for both.
            published = published and atomic_write(stats_path(self.out, self.shard),
                                                   json.dumps(stats, indent=2).encode(), unique=True, guard=self.guard)
        except FileNotFoundError:  # a new holder cleared our temporary files: we lost the shard meanwhile
            if self.guard is None or self.guard():
                raise
            published = False
        if not published:
            self.abort()
            return None
        return stats

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
        if self._parquet_tmp is not None:
            self._parquet_tmp.unlink(missing_ok=True)
