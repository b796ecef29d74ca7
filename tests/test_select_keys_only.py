"""`capfilt select --keys-only FILE`: the kept keys with their chosen caption, from recorded scores alone; a
training job that reads only those samples from the original shards (webdataset, `datasets`), as the README
shows, sees exactly what a full `select` writes, with the same captions."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import cli, demo_samples, write_tar

from capfilt.bootstrap.keylist import read_keys_header

SETTINGS = [[], ["--threshold", "MEDIAN"], ["--policy", "blip2", "--keep-top", 1, "--fraction", 0.5]]


@pytest.fixture
def recorded(tmp_path, tiny_models) -> tuple[Path, Path]:
    """Input shards (3, of real photos) and a bootstrap run's output over them: a web and 2 synthetic captions
    per image, so that the chosen caption is sometimes a synthetic one."""
    shards = tmp_path / "in"
    shards.mkdir()
    samples = demo_samples(18)
    for i in range(3):
        write_tar(shards / f"part-{i:05d}.tar", samples[6 * i: 6 * (i + 1)])
    out = tmp_path / "recorded"
    result = cli("bootstrap", shards, "--out", out, "--captioner", tiny_models["blip_captioner"], "--filter",
                 tiny_models["blip_itm"], "--num-captions", 2, "--threshold", 0.0, "--workers", 0, "-q")
    assert result.exit_code == 0, result.output
    return shards, out


def full_select(shards: Path, source: Path, out: Path, *settings) -> dict[tuple[str, str], tuple[str, bytes]]:
    """What a full select writes: (shard, key) -> (txt, jpg bytes)."""
    result = cli("select", shards, "--from", source, "--out", out, "-q", *settings)
    assert result.exit_code == 0, result.output
    written = {}
    for tar in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            written[(tar.stem, s["__key__"])] = (s["txt"].decode(), s["jpg"])
    return written


def keys_only(shards: Path, source: Path, path: Path, *settings):
    result = cli("select", shards, "--from", source, "--keys-only", path, *settings)
    assert result.exit_code == 0, result.output
    return result


# The README's recipe ("Selecting"), as a training job would run it.
def read_with_webdataset(keys_file: Path) -> dict[tuple[str, str], tuple[str, bytes]]:
    keys = pq.read_table(keys_file, columns=["url", "key", "caption"]).to_pylist()
    keep = {(k["url"], k["key"]): k["caption"] for k in keys}
    urls = sorted({k["url"] for k in keys})
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
               .select(lambda s: (s["__url__"], s["__key__"]) in keep)
               .map(lambda s: {**s, "txt": keep[(s["__url__"], s["__key__"])]}))
    return {(Path(s["__url__"]).stem, s["__key__"]): (s["txt"], s["jpg"]) for s in dataset}


def read_with_datasets(keys_file: Path, cache: Path) -> dict[tuple[str, str], tuple[str, bytes]]:
    import datasets

    keys = pq.read_table(keys_file, columns=["url", "key", "caption"]).to_pylist()
    keep = {(k["url"], k["key"]): k["caption"] for k in keys}
    urls = sorted({k["url"] for k in keys})
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(cache))
    ds = ds.filter(lambda s: (s["__url__"], s["__key__"]) in keep)
    ds = ds.map(lambda s: {"txt": keep[(s["__url__"], s["__key__"])]})
    ds = ds.cast_column("jpg", datasets.Image(decode=False))  # here: bytes, to compare with the shards'
    return {(Path(s["__url__"]).stem, s["__key__"]): (s["txt"], s["jpg"]["bytes"]) for s in ds}


@pytest.mark.parametrize("settings", SETTINGS, ids=["recorded", "threshold", "blip2-fraction"])
def test_a_training_job_reading_the_keys_sees_what_a_full_select_writes(recorded, tmp_path, settings, monkeypatch):
    shards, source = recorded
    scores = sorted(s for p in source.glob("*.parquet") for r in pq.read_table(p).to_pylist()
                    for s in [r["web_score"], *r["synthetic_scores"]] if s is not None)
    settings = [scores[len(scores) // 2] if v == "MEDIAN" else v for v in settings]  # some kept, some not
    full = full_select(shards, source, tmp_path / "full", *settings)
    keys_file = tmp_path / "keep.parquet"
    result = keys_only(shards, source, keys_file, *settings)
    assert 0 < len(full) < 18 or settings == []  # the settings select part of the corpus
    assert f"keys: {len(full)} of 18 samples in 3 shard(s)" in result.output

    table = pq.read_table(keys_file)
    assert {(r["shard"], r["key"]): r["caption"] for r in table.to_pylist()} == \
        {k: caption for k, (caption, _) in full.items()}
    assert read_with_webdataset(keys_file) == full
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert read_with_datasets(keys_file, tmp_path / "cache") == full
    header = read_keys_header(keys_file)
    manifest = json.loads((tmp_path / "full" / "capfilt_run.json").read_text())["settings"]
    assert header["selection"] == manifest["selection"]
    assert header["fraction"] == manifest.get("fraction")
    assert header["score_kind"] == "probability"  # what `score` means: a P(match), not a cosine


def test_synthetic_captions_are_chosen_where_they_score_best(recorded, tmp_path):
    shards, source = recorded
    keys_file = tmp_path / "keep.parquet"
    keys_only(shards, source, keys_file)
    rows = pq.read_table(keys_file).to_pylist()
    assert {r["source"] for r in rows} == {"web", "synthetic"}  # both kinds win somewhere in this corpus
    assert all(r["caption"] == r["kept_captions"][0] and r["score"] == max(r["kept_scores"]) for r in rows)


def test_keys_come_from_the_recorded_scores_alone(recorded, tmp_path):
    shards, source = recorded
    before = tmp_path / "before.parquet"
    keys_only(shards, source, before)
    for tar in shards.glob("*.tar"):  # no image (nor any byte of the inputs) is read
        tar.write_bytes(b"not a tar any more")
    after = tmp_path / "after.parquet"
    keys_only(shards, source, after)
    assert pq.read_table(after).equals(pq.read_table(before))


def test_the_keys_file_is_never_written_over_a_file_or_into_the_run(recorded, tmp_path):
    shards, source = recorded
    mine = tmp_path / "mine.parquet"
    mine.write_bytes(b"a file of the user's")
    refused = cli("select", shards, "--from", source, "--keys-only", mine, "--overwrite")
    assert refused.exit_code == 2 and "not a keys file" in refused.output
    assert mine.read_bytes() == b"a file of the user's"
    inside = cli("select", shards, "--from", source, "--keys-only", source / "keep.parquet")
    assert inside.exit_code == 2 and "never altered" in inside.output
    keys = tmp_path / "keep.parquet"
    keys_only(shards, source, keys)
    again = cli("select", shards, "--from", source, "--keys-only", keys)
    assert again.exit_code == 2 and "--overwrite" in again.output
    keys_only(shards, source, keys, "--threshold", 0.9, "--overwrite")
    neither = cli("select", shards, "--from", source)
    assert neither.exit_code == 2 and "--keys-only" in neither.output
