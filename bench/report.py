"""`capfilt report` time and peak RSS at 1x and 10x an output's size: memory should stay flat, time linear.

The recorded run is made without models: a `capfilt synth` corpus with planted noise, given seeded scores
(planted captions score lower, as a filter that works would) and written through the pipeline's own
per-sample writer, so the output has the real format (tars, parquet, stats with their inputs, manifest).
Each report runs in a fresh process that measures its own peak RSS.

    python bench/report.py                 # 10,000 and 100,000 rows, 1,000 per shard
    python bench/report.py --rows 2000 --factor 5
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.report")


def make_output(root: Path, rows: int, per_shard: int, seed: int = 0) -> Path:
    from capfilt.bootstrap.outcome import input_location, write_candidates
    from capfilt.data import reader
    from capfilt.data.schema import Candidate
    from capfilt.data.synth import write_synth
    from capfilt.data.writer import ShardWriter, prepare_output
    from capfilt.settings import SelectionConfig, SynthConfig

    inputs, out = root / "in", root / "out"
    write_synth(inputs, SynthConfig(n=rows, per_shard=per_shard, noise=0.3, size=32, seed=seed))
    selection = SelectionConfig(threshold=0.5)
    urls = reader.expand_specs([str(inputs)])
    prepare_output(out, {"bench": "report", "captioner": {"model": "bench-captioner"},
                         "filter": {"model": "bench-filter"}, "selection": dict(selection.__dict__)}, False,
                   [reader.shard_name(u) for u in urls])
    rng = random.Random(seed)
    for url in urls:
        writer = ShardWriter(out, reader.shard_name(url))
        for sample in reader.read_shard(url):
            writer.stats.read += 1
            noisy = sample.meta["synth"]["noisy"]
            web = min(1.0, max(0.0, rng.gauss(0.3 if noisy else 0.7, 0.15)))
            cands = [Candidate(sample.web_caption, "web", web)] + [
                Candidate(f"a synthetic caption {i} of {sample.key}", "synthetic", rng.random()) for i in range(2)]
            writer.stats.synthetic_generated += 2
            writer.stats.captions_scored += 3
            write_candidates(writer, sample, cands, selection, "bench-captioner", "bench-filter")
        writer.commit({"duration_s": 0.0, "samples_per_s": 0.0, "input": input_location(url)})
    return out


def measure(out: Path) -> dict:
    """Report `out` in a fresh process; its wall time and its own peak RSS."""
    code = ("import json, resource, time, sys; t = time.perf_counter();"
            "from capfilt.bootstrap.report import write_report; from capfilt.settings import ReportConfig;"
            f"p = write_report(ReportConfig(out={str(out)!r}));"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mib': "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'page_kib': p.stat().st_size / 1024}))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows at 1x")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-report-") as tmp:
        for scale in (1, args.factor):
            rows = args.rows * scale
            started = time.perf_counter()
            out = make_output(Path(tmp) / f"x{scale}", rows, args.per_shard)
            log.info("built a %s-row output in %.0f s", f"{rows:,}", time.perf_counter() - started)
            result = {"rows": rows, **measure(out)}
            results.append(result)
            log.info("%s rows: %.1f s, peak RSS %.0f MiB, page %.0f KiB", f"{rows:,}", result["seconds"],
                     result["peak_rss_mib"], result["page_kib"])
    small, large = results
    log.info("time x%.1f for rows x%d; peak RSS %+.0f MiB", large["seconds"] / small["seconds"], args.factor,
             large["peak_rss_mib"] - small["peak_rss_mib"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
