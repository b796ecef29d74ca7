"""How close does `bootstrap` run to the speed of its models?

Times one end-to-end `bootstrap` (read tars, decode and preprocess in DataLoader workers, caption, score,
select, write shards) against the compute alone: the same models on the same batches, already decoded into
tensors in memory. The ratio end-to-end / compute-only is 1.0 when I/O and decoding are fully hidden.

    python bench/bootstrap.py                     # both model sizes, demo corpus x4
    python bench/bootstrap.py --size base --copies 8 --workers 2 --batch-size 16

Models are random (`capfilt.testing`), so the numbers measure throughput only; `base` is a size where compute
matters (hidden 256, 4 layers, 224 px), `tiny` one where I/O dominates.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from capfilt.captioner import Captioner, CaptionerConfig
from capfilt.pipeline import RunConfig, batch_seed, run, shared_transforms
from capfilt.reader import Batch, ShardStream, expand_specs
from capfilt.scorer import Scorer, ScorerConfig
from capfilt.selection import SelectionConfig
from capfilt.testing import build_tiny_models

SIZES = {"tiny": dict(hidden=32, layers=2, image_size=32, patch=8),
         "base": dict(hidden=256, layers=4, image_size=224, patch=16)}
DEMO = Path(__file__).resolve().parents[1] / "shards"


def make_corpus(root: Path, copies: int) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for copy in range(copies):
        for shard in sorted(DEMO.glob("demo-*.tar")):
            shutil.copy(shard, corpus / f"{shard.stem}-{copy:03d}.tar")
    return corpus


def compute_only(batches: list[Batch], captioner: Captioner, scorer: Scorer, keys) -> float:
    start = time.perf_counter()
    for batch in batches:
        good = [s for s in batch.samples if s.error is None]
        captions = captioner(batch.pixels[keys[0]], seed=batch_seed(0, batch.shard, batch.index))
        scorer(batch.pixels[keys[1]], [[s.web_caption, *c] for s, c in zip(good, captions)])
    return time.perf_counter() - start


def bench(size: str, copies: int, workers: int, batch_size: int, num_captions: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    try:
        models = build_tiny_models(root / "models", **SIZES[size])
        captioner = Captioner(CaptionerConfig(model=models["blip_captioner"], num_captions=num_captions))
        scorer = Scorer(ScorerConfig(model=models["blip_itm"]))
        corpus = make_corpus(root, copies)
        transforms, *keys = shared_transforms(captioner, scorer)
        batches = [b for b in ShardStream(expand_specs([str(corpus)]), transforms, batch_size)
                   if isinstance(b, Batch)]
        samples = sum(len(b.samples) for b in batches)
        compute_only(batches[:1], captioner, scorer, keys)  # warm-up
        compute_s = compute_only(batches, captioner, scorer, keys)

        config = RunConfig(specs=(str(corpus),), out=str(root / "out"), batch_size=batch_size, workers=workers,
                           progress=False)
        start = time.perf_counter()
        summary = run(config, captioner=captioner, scorer=scorer, selection=SelectionConfig())
        end_to_end_s = time.perf_counter() - start
        assert summary.samples == samples
        return dict(size=size, samples=samples, workers=workers, batch_size=batch_size,
                    compute_per_s=samples / compute_s, end_to_end_per_s=samples / end_to_end_s,
                    ratio=compute_s / end_to_end_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--copies", type=int, default=4, help="demo corpus copies (80 images each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-captions", type=int, default=1)
    args = parser.parse_args()
    sizes = list(SIZES) if args.size == "both" else [args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'size':<6}{'images':>8}{'workers':>9}{'batch':>7}{'compute img/s':>15}{'end-to-end img/s':>18}{'ratio':>8}")
    for size in sizes:
        r = bench(size, args.copies, args.workers, args.batch_size, args.num_captions)
        print(f"{r['size']:<6}{r['samples']:>8}{r['workers']:>9}{r['batch_size']:>7}{r['compute_per_s']:>15.1f}"
              f"{r['end_to_end_per_s']:>18.1f}{r['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
