"""Peak memory of `capfilt bootstrap` on a shard with absurd members, against the same shard without them.

The shard of issue 22: about 80 MB, ordinary samples plus one whose txt caption is 50 MB and one whose json
caption is 30 MB. `bootstrap` runs on it with tiny random models (`capfilt.testing`), batch 16, in a fresh child
process; reported is the peak RSS of the largest process of that run (RUSAGE_CHILDREN's ru_maxrss, measured by
a wrapper process, so nothing else this script did counts). The baseline is the same run on the shard without
the two huge samples. Target: the huge members add nothing (they are skipped unread from their tar headers).

    python bench/big_members.py                         # this checkout
    python bench/big_members.py --checkout /tmp/main    # another checkout's capfilt (e.g. before the limits)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import webdataset as wds

from capfilt.testing import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def demo_samples(n: int) -> list[dict]:
    shards = sorted(str(p) for p in (REPO / "shards").glob("demo-*.tar"))
    samples = []
    for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        samples.append({k: s[k] for k in ("__key__", "jpg", "txt", "json")})
        if len(samples) == n:
            return samples
    return samples


def write_shard(path: Path, huge: bool, txt_mb: int, json_mb: int) -> None:
    good = demo_samples(32)
    samples = good[:16] + good[18:]
    if huge:
        samples[8:8] = [{**good[16], "__key__": "hugetxt", "txt": b"a cat " * (txt_mb * 2**20 // 6)},
                        {"__key__": "hugejson", "jpg": good[17]["jpg"],
                         "json": json.dumps({"caption": "x" * json_mb * 2**20}).encode()}]
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)


def peak_rss_mib(checkout: Path, shard_dir: Path, out: Path, models: dict[str, str], batch: int,
                 workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "capfilt", "bootstrap", str(shard_dir), "--out",
               str(out), "--captioner", models["blip_captioner"], "--filter", models["blip_itm"], "--batch-size",
               str(batch), "--workers", str(workers), "--quiet"]
    code, kib = map(int, subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True,
                                        check=True).stdout.split())
    if code != 0:
        raise SystemExit(f"bootstrap failed (exit {code}) in {checkout}")
    return kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose capfilt runs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--txt-mb", type=int, default=50)
    parser.add_argument("--json-mb", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_tiny_models(root / "models")
        for huge in (False, True):
            shard_dir = root / f"in-{huge}"
            shard_dir.mkdir()
            write_shard(shard_dir / "big.tar", huge, args.txt_mb, args.json_mb)
            size = (shard_dir / "big.tar").stat().st_size / 1e6
            mib = peak_rss_mib(args.checkout, shard_dir, root / f"out-{huge}", models, args.batch_size, args.workers)
            label = f"with a {args.txt_mb} MB txt and a {args.json_mb} MB json" if huge else "without the huge members"
            print(f"{args.checkout}: shard of {size:.0f} MB {label}: peak RSS {mib:,.0f} MiB "
                  f"(batch {args.batch_size}, workers {args.workers})", flush=True)


if __name__ == "__main__":
    main()
