"""The output directory a run writes: readable by webdataset and datasets, settings that refuse to mix, user files
never touched, no empty tar, every file durable before the stats file that vouches for it."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import bootstrap_args, cli, demo_samples, mixed_shards, read_json, write_tar


@pytest.fixture
def shards(tmp_path) -> Path:
    return mixed_shards(tmp_path / "in")


def test_output_reads_with_webdataset_and_datasets(shards, tmp_path, tiny_models, monkeypatch):
    out = tmp_path / "out"
    assert cli(*bootstrap_args(shards, out, tiny_models, "--threshold", 0)).exit_code == 0
    tars = sorted(str(p) for p in out.glob("*.tar"))
    written = sum(read_json(p)["written"] for p in out.glob("*_stats.json"))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == written > 0
    assert all(s["jpg"].size[0] > 0 and isinstance(s["json"]["capfilt"], dict) for s in samples)

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "c"))
    assert len(ds) == written
    assert set(ds.column_names) >= {"__key__", "jpg", "txt", "json"}


def test_changed_settings_refuse_to_mix_with_existing_output(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    assert cli(*bootstrap_args(shards, out, tiny_models)).exit_code == 0
    result = cli(*bootstrap_args(shards, out, tiny_models, "--threshold", 0.9))
    assert result.exit_code == 2 and "other settings (selection)" in result.output
    result = cli(*bootstrap_args(shards, out, tiny_models, "--threshold", 0.9, "--overwrite"))
    assert result.exit_code == 0
    assert read_json(out / "capfilt_run.json")["settings"]["selection"]["threshold"] == 0.9


# ------------------------------------------------------------------------------------------------ user data


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_holding_the_input_shards_is_refused_and_nothing_is_touched(shards, tmp_path, tiny_models,
                                                                           overwrite):
    """img2dataset's folder as --out (itself, or a folder above it): refused before anything is written."""
    before = _snapshot(tmp_path)
    flag = ["--overwrite"] if overwrite else []
    for out in (shards, tmp_path):
        result = cli(*bootstrap_args(shards, out, tiny_models, *flag))
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "holds the input shard" in lines[0], result.output
    assert _snapshot(tmp_path) == before


def test_overwrite_deletes_only_what_the_capfilt_run_wrote(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    assert cli(*bootstrap_args(shards / "part-00000.tar", out, tiny_models)).exit_code == 0
    mine = {"notes.txt": b"my notes", "mine.tar": (shards / "part-00003.tar").read_bytes(),
            "mine.parquet": b"not capfilt's", "mine_stats.json": b"{}"}
    for name, data in mine.items():
        (out / name).write_bytes(data)

    result = cli(*bootstrap_args(shards / "part-00003.tar", out, tiny_models, "--threshold", 0, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert not (out / "part-00000_stats.json").exists() and not (out / "part-00000.parquet").exists()
    assert (out / "part-00003_stats.json").exists()
    assert read_json(out / "capfilt_run.json")["shards"] == ["part-00003"]

    # A new input shard whose output names a file capfilt did not write: refused, the file kept.
    (shards / "mine.tar").write_bytes((shards / "part-00000.tar").read_bytes())
    for flag in ([], ["--overwrite"]):
        result = cli(*bootstrap_args(shards / "mine.tar", out, tiny_models, "--threshold", 0, *flag))
        assert result.exit_code == 2 and "holds mine.tar, which no capfilt run there wrote" in result.output
    assert {name: (out / name).read_bytes() for name in mine} == mine


def test_errors_that_name_overwrite_say_what_it_deletes(shards, tmp_path, tiny_models):
    out, foreign = tmp_path / "out", tmp_path / "foreign"
    assert cli(*bootstrap_args(shards, out, tiny_models)).exit_code == 0
    changed = cli(*bootstrap_args(shards, out, tiny_models, "--threshold", 0.9))
    assert changed.exit_code == 2
    assert "--overwrite to delete that run's 4 shard(s) (their .tar, .parquet and _stats.json" in changed.output
    foreign.mkdir()
    (foreign / "00000.tar").write_bytes(b"someone's shard")
    for flag in ([], ["--overwrite"]):
        result = cli(*bootstrap_args(shards, foreign, tiny_models, *flag))
        assert result.exit_code == 2 and "holds no capfilt run: choose another --out" in result.output
    assert (foreign / "00000.tar").read_bytes() == b"someone's shard"


# ------------------------------------------------------------------------------------------------ readers


def test_shards_that_keep_nothing_leave_no_tar_and_datasets_loads_the_output(tmp_path, tiny_models, monkeypatch):
    """`datasets` fails on an empty tar that sorts first; a shard keeping nothing has a parquet and stats only."""
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "a-000.tar", [{"__key__": f"x{i}", "txt": b"a caption without its image"} for i in range(3)])
    write_tar(d / "b-001.tar", demo_samples(4))
    write_tar(d / "c-002.tar", [{**s, "jpg": b"not a jpeg"} for s in demo_samples(2, start=4)])
    out = tmp_path / "out"
    args = ["filter", d, "--out", out, "--filter", tiny_models["blip_itm"], "--threshold", 0, "--workers", 0,
            "--quiet"]
    assert cli(*args).exit_code == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["b-001.tar"]
    assert read_json(out / "a-000_stats.json")["errors"] == {"no_image": 3}
    assert len(pq.read_table(out / "c-002.parquet")) == 2

    # An attempt killed after renaming its tar, redone keeping nothing: the stale tar goes.
    (out / "a-000_stats.json").unlink()
    (out / "a-000.tar").write_bytes((d / "b-001.tar").read_bytes())
    assert "1 shards done, 2 already done" in cli(*args).output
    assert sorted(p.name for p in out.glob("*.tar")) == ["b-001.tar"]

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ds = datasets.load_dataset("webdataset", data_files={"train": str(out / "*.tar")}, split="train",
                               cache_dir=str(tmp_path / "c"))
    assert sorted(ds["__key__"]) == sorted(s["__key__"] for s in demo_samples(4))


# ------------------------------------------------------------------------------------------------ durability


def test_every_file_a_stats_file_vouches_for_is_durable_before_it(shards, tmp_path, tiny_models, monkeypatch):
    """After a power loss a shard marked done must have its data: each .tar and .parquet is fsynced, renamed and
    its directory fsynced before the stats file that vouches for it is renamed into place."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    assert cli("filter", shards, "--out", out, "--filter", tiny_models["blip_itm"], "--threshold", 0, "--workers", 0,
               "--quiet").exit_code == 0
    monkeypatch.setattr(os, "replace", real_replace)
    for stats in sorted(out.glob("*_stats.json")):
        shard = stats.name[: -len("_stats.json")]
        vouched = [out / f"{shard}.parquet"] + ([out / f"{shard}.tar"] if read_json(stats)["written"] else [])
        done = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(stats))
        for path in vouched + [stats]:
            renamed = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(path))
            tmp = events[renamed][1]
            assert ("fsync", tmp) in events[:renamed], f"{path.name} renamed before its data was synced"
            dir_synced = [i for i, e in enumerate(events) if e == ("fsync", str(out.resolve())) and i > renamed]
            assert dir_synced, f"{path.name}: directory never synced after the rename"
            if path != stats:
                assert dir_synced[0] < done, f"{path.name}: its name may not survive a crash that keeps the stats"
