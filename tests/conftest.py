"""Tiny BLIP / BLIP-2 captioners and filters built from configs, saved, and loaded back through
`from_pretrained(dir)` exactly as a user's checkpoint is; shard builders with real COCO JPEGs and bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from capfilt.testing import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARDS = sorted((REPO / "shards").glob("demo-*.tar"))


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    # datasets writes lock files under HF_HOME even with cache_dir; never the user's or CI's home.
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _capfilt_logging():
    """capfilt's messages on stderr, as the CLI sets them up, also where a test calls the library directly."""
    from capfilt import log

    log.configure()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of saved tiny checkpoints: blip_captioner, blip_itm, blip2_captioner, blip2_itm."""
    return build_tiny_models(tmp_path_factory.mktemp("models"))


# ------------------------------------------------------------------------------------------------ shards


def demo_samples(n: int, start: int = 0) -> list[dict]:
    """Real COCO samples (jpg bytes, caption, json) from the bundled demo shards."""
    samples = []
    for sample in wds.WebDataset([str(p) for p in DEMO_SHARDS], shardshuffle=False, empty_check=False):
        samples.append({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"],
                        "json": sample["json"]})
        if len(samples) == start + n:
            break
    return samples[start:]


def mixed_shards(d: Path, last: bool = True) -> Path:
    """Input shards under `d`: 10 good samples, every kind of bad input, a truncated tar, and (`last`) 5 more good."""
    d.mkdir()
    write_tar(d / "part-00000.tar", demo_samples(10))
    write_tar(d / "part-00001.tar", strip_none(bad_samples()))
    truncate(write_tar(d / "part-00002.tar", demo_samples(8, start=10)), 0.6)
    if last:
        write_tar(d / "part-00003.tar", demo_samples(5, start=20))
    return d


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return path


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def bad_samples() -> list[dict]:
    """One good sample between each kind of bad input, keys saying what each is."""
    good = demo_samples(6)
    jpg = good[0]["jpg"]
    return [
        {**good[0], "__key__": "good0"},
        {**good[1], "__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg"},
        {**good[2], "__key__": "truncjpg", "jpg": jpg[: len(jpg) // 3]},
        {"__key__": "nocaption", "jpg": good[3]["jpg"]},
        {**good[3], "__key__": "latin1", "txt": "caf\xe9 au lait".encode("latin-1"), "json": b"{}"},
        {"__key__": "noimage", "txt": b"a caption without a picture"},
        {**good[4], "__key__": "good1"},
        {**good[5], "__key__": "jsoncap", "txt": None, "json": json.dumps({"caption": "a cat on a table"}).encode()},
    ]


def strip_none(samples):
    return [{k: v for k, v in s.items() if v is not None} for s in samples]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
