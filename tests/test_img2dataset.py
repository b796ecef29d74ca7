"""The round trip a user makes: a real img2dataset downloads photos (and fails on some URLs) from a server on
127.0.0.1, capfilt bootstraps its output, and webdataset, `datasets` and pyarrow read what capfilt wrote."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import img2dataset_env
import pyarrow.dataset
import pytest
import webdataset as wds
from helpers import demo_samples
from typer.testing import CliRunner

from capfilt.cli import app


@pytest.fixture(scope="module")
def img2dataset() -> Path:
    try:
        return img2dataset_env.build()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build img2dataset's own venv ({img2dataset_env.REQUIREMENT} in "
                    f"{img2dataset_env.VENV}): {exc}; `python3 tests/img2dataset_env.py` builds it where PyPI is "
                    "reachable")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def photo_server(tmp_path):
    """Serves real COCO JPEGs and one file that is not an image; yields the base URL and the served bytes."""
    root = tmp_path / "www"
    root.mkdir()
    photos = {}
    for sample in demo_samples(6):
        name = f"{sample['__key__']}.jpg"
        (root / name).write_bytes(sample["jpg"])
        photos[name] = (sample["jpg"], sample["txt"].decode().strip())
    (root / "notimage.jpg").write_bytes(b"<html>a login page, not a photo</html>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", photos
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_img2dataset_output_through_capfilt_reads_back_whole(img2dataset, photo_server, tmp_path, tiny_models,
                                                             monkeypatch):
    base, photos = photo_server
    names = sorted(photos)
    refused = f"http://127.0.0.1:{_closed_port()}/gone.jpg"
    rows = [  # 4 per shard: the first shard downloads only the non-image, so capfilt keeps nothing of it
        (f"{base}/missing-1.jpg", "a"), (refused, "b"), (f"{base}/notimage.jpg", "c"), (f"{base}/missing-2.jpg", "d"),
        *[(f"{base}/{n}", photos[n][1]) for n in names[:4]],
        (f"{base}/{names[4]}", ""), (f"{base}/{names[5]}", ""), (f"{base}/missing-3.jpg", "e"),
        (f"{base}/{names[0]}", photos[names[0]][1]),
    ]
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        csv.writer(f).writerows([("url", "caption"), *rows])
    shards = tmp_path / "img2dataset"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", no_proxy="127.0.0.1")
    subprocess.run([str(img2dataset), "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv",
                    "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                    "--output_folder", str(shards), "--processes_count", "1", "--thread_count", "4",
                    "--number_sample_per_shard", "4", "--resize_mode", "no", "--disable_all_reencoding", "True",
                    "--enable_wandb", "False", "--timeout", "5", "--retries", "0",
                    "--distributor", "multiprocessing"], check=True, env=env, capture_output=True, timeout=120)
    downloaded = pyarrow.dataset.dataset(sorted(map(str, shards.glob("*.parquet"))), format="parquet").to_table()
    by_status = {}
    for row in downloaded.select(["url", "status"]).to_pylist():
        by_status.setdefault(row["status"], []).append(row["url"])
    assert len(by_status["success"]) == 8 and len(by_status["failed_to_download"]) == 4  # as a user sees it
    inputs = {}
    for sample in wds.WebDataset(sorted(map(str, shards.glob("*.tar"))), shardshuffle=False, empty_check=False):
        inputs[sample["__key__"]] = sample
    assert len(inputs) == 8

    # capfilt on img2dataset's own folder is refused before it touches anything, --overwrite or not.
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    runner = CliRunner()
    models = ["--captioner", tiny_models["blip_captioner"], "--filter", tiny_models["blip_itm"]]
    refusal = runner.invoke(app, ["bootstrap", str(shards), "--out", str(shards), *models, "--overwrite", "--quiet"])
    assert refusal.exit_code == 2 and "holds the input shard" in refusal.output
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before

    out = tmp_path / "cleaned"
    result = runner.invoke(app, ["bootstrap", str(shards), "--out", str(out), *models, "--threshold", "0",
                                 "--num-captions", "2", "--workers", "0", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output

    # pyarrow: one row per downloaded sample, each exactly once, and the non-image an error.
    table = pyarrow.dataset.dataset(sorted(map(str, out.glob("*.parquet"))), format="parquet").to_table()
    results = {row["key"]: row for row in table.to_pylist()}
    assert len(results) == table.num_rows == len(inputs) and set(results) == set(inputs)
    not_image = next(k for k, s in inputs.items() if json.loads(s["json"])["url"].endswith("notimage.jpg"))
    assert results[not_image]["reason"] == "corrupt_image"
    kept = {k for k, r in results.items() if r["status"] == "ok"}
    assert kept == set(inputs) - {not_image}  # threshold 0: every photo kept
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert [s["shard"] for s in stats] == ["00000", "00001", "00002"] and sum(s["written"] for s in stats) == 7
    assert not (out / "00000.tar").exists()  # it kept nothing: no empty tar for readers to trip on

    # Photos without a caption were captioned from the image alone.
    for key, row in results.items():
        caption = json.loads(inputs[key]["json"])["caption"]
        if key in kept and not caption:
            assert row["web_caption"] is None and row["detail"] == "the txt member is empty"
            assert len(row["synthetic_captions"]) >= 1

    # webdataset: the kept samples, image bytes exactly as served, img2dataset's json fields all there.
    tars = sorted(map(str, out.glob("*.tar")))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(kept)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["jpg"] == photos[meta["url"].rsplit("/", 1)[1]][0]
        original = json.loads(inputs[sample["__key__"]]["json"])
        assert {k: meta[k] for k in original} == original
        assert sample["txt"].decode() in [c["caption"] for c in meta["capfilt"]["candidates"] if c["kept"]]

    # datasets, as the README says to read it.
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ds = datasets.load_dataset("webdataset", data_files={"train": str(out / "*.tar")}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(ds["__key__"]) == sorted(kept)
    by_key = {row["__key__"]: row for row in ds}
    some = sorted(kept)[0]
    assert by_key[some]["json"]["url"] == json.loads(inputs[some]["json"])["url"]
