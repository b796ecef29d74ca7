"""A member of absurd size (web alt-text of 50 MB, a json of 30 MB) costs no memory: it is skipped unread from
its tar header, and its sample becomes an error row with its own reason."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from helpers import demo_samples, png_bytes, write_tar

from capfilt.data.reader import MemberLimits, read_shard
from capfilt.errors import CapfiltError
from capfilt.settings import RunConfig


def test_members_over_their_limit_are_error_rows_and_never_read(tmp_path, monkeypatch):
    good = demo_samples(2)
    image_limit, json_limit = (max(len(s[ext]) for s in good) for ext in ("jpg", "json"))
    path = write_tar(tmp_path / "big.tar", [
        good[0],
        {**good[1], "__key__": "longtxt", "txt": b"a" * 101},
        {**good[1], "__key__": "bigjson", "json": json.dumps({"caption": "b" * json_limit}).encode()},
        {"__key__": "bigpng", "png": png_bytes() + b"\0" * image_limit, "txt": b"a red square"},
        {**good[1], "__key__": "extra", "npy": b"\0" * 10_000},  # a member no sample uses: never read at all
        {**good[1], "__key__": "fits", "txt": b"a" * 100},  # exactly at the limit: fine
    ])
    read_members = []
    real_extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: read_members.append(member.name) or real_extract(self, member))
    limits = MemberLimits(image=image_limit, caption=100, json=json_limit)
    rows = {s.key: s for s in read_shard(str(path), limits)}
    assert {k: s.error for k, s in rows.items()} == {
        good[0]["__key__"]: None, "longtxt": "caption_too_long", "bigjson": "json_too_large",
        "bigpng": "image_too_large", "extra": None, "fits": None}
    assert rows["longtxt"].detail == "its txt member is 101 bytes, over --max-caption-bytes (100)"
    big = rows["bigpng"].detail
    assert big.startswith("its png member is ") and big.endswith(f"over --max-image-bytes ({image_limit:,})")
    assert not {"longtxt.txt", "bigjson.json", "bigpng.png", "extra.npy"} & set(read_members)
    assert rows["fits"].web_caption == "a" * 100 and rows["extra"].image == good[1]["jpg"]


def test_limits_are_settings_and_default_to_what_ordinary_data_never_meets():
    assert MemberLimits() == MemberLimits(64 * 2**20, 64 * 2**10, 2**20)
    config = RunConfig(specs=("x",), out="o", max_caption_bytes=10)
    assert MemberLimits.of(config) == MemberLimits(64 * 2**20, 10, 2**20)
    with pytest.raises(CapfiltError, match="at least 1"):
        RunConfig(specs=("x",), out="o", max_json_bytes=0)


PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB: the largest descendant's peak
"""


def test_a_shard_with_huge_members_runs_in_bounded_memory_and_every_sample_has_its_row(tmp_path, tiny_models):
    """The issue's shard: 80 MB, one 50 MB txt and one 30 MB json caption, tiny models, batch 16. Before the
    limits its run peaked at 10 GiB (the caption read, decoded, tokenised and copied into the parquet)."""
    good = demo_samples(6)
    samples = good[:3] + [
        {**good[3], "__key__": "hugetxt", "txt": b"a cat " * (50 * 2**20 // 6)},
        {**good[4], "__key__": "hugejson", "txt": None, "json": json.dumps({"caption": "x" * 30 * 2**20}).encode()},
        good[5]]
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "big.tar", [{k: v for k, v in s.items() if v is not None} for s in samples])
    assert (shards / "big.tar").stat().st_size > 80 * 10**6
    out = tmp_path / "out"
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "capfilt", "bootstrap", str(shards), "--out",
               str(out), "--captioner", tiny_models["blip_captioner"], "--filter", tiny_models["blip_itm"],
               "--batch-size", "16", "--workers", "1", "--quiet"]
    code, peak_kib = map(int, subprocess.run(command, capture_output=True, text=True, check=True).stdout.split())
    assert code == 0
    assert peak_kib < 1.5 * 2**20, f"peak RSS {peak_kib / 2**10:.0f} MiB"
    rows = {r["key"]: r for r in pq.read_table(out / "big.parquet").to_pylist()}
    assert set(rows) == {s["__key__"] for s in samples}
    assert (rows["hugetxt"]["status"], rows["hugetxt"]["reason"]) == ("error", "caption_too_long")
    assert (rows["hugejson"]["status"], rows["hugejson"]["reason"]) == ("error", "json_too_large")
    assert all(r["status"] != "error" for k, r in rows.items() if not k.startswith("huge"))
