"""What the tests share besides fixtures (those are in conftest.py): shard builders with real COCO JPEGs and bad
input, readers of the files a run writes, and the CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import webdataset as wds
from typer.testing import CliRunner

from capfilt.cli import app

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARDS = sorted((REPO / "shards").glob("demo-*.tar"))
TIMINGS = ("duration_s", "samples_per_s")  # the stats fields that differ between two runs of the same work


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


# ------------------------------------------------------------------------------------------------ the CLI


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bootstrap_args(shards, out, models, *extra):
    return ["bootstrap", shards, "--out", out, "--captioner", models["blip_captioner"], "--filter",
            models["blip_itm"], "--batch-size", 4, "--workers", 0, "--quiet", *extra]


def outputs(out: Path) -> dict[str, bytes]:
    """An output's data files, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}


def counts(out: Path) -> dict[str, dict]:
    """An output's stats files, timings left out."""
    return {p.name: {k: v for k, v in read_json(p).items() if k not in TIMINGS} for p in out.glob("*_stats.json")}


@contextlib.contextmanager
def interrupted_at_batch(n: int):
    """Within it, a run is interrupted as its n-th batch starts (Ctrl-C: the run's finally blocks run)."""
    from capfilt.bootstrap import pipeline  # here: the model code is not for every test that imports helpers

    real_process, calls = pipeline._process, []

    def dies_on_nth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_process(*args, **kwargs)

    pipeline._process = dies_on_nth_batch
    try:
        yield
    finally:
        pipeline._process = real_process
