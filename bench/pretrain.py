"""Does data loading keep up with stage-1 Q-Former pre-training?

Times the same `capfilt.train.pretrain.fit` two ways, from the same initial weights (dropout 0), batch size and steps:

    in-memory   batches read once beforehand (same PairStream, no workers), tokenized, kept as tensors in a
                list and fed round and round: the speed of the training step alone
    end-to-end  the real path, `shard_batches`: tars on disk -> `PairStream` (resampled, shuffle buffer) ->
                `load_pairs` DataLoader workers (PNG decode, image processor, `Tokenize`) -> the step

The ratio end-to-end / in-memory is 1.0 when loading is fully hidden behind the step. `data-only` is the
loader by itself (the same `shard_batches`, no model): what it can deliver when it has the machine to itself.

    python bench/pretrain.py                      # both sizes
    python bench/pretrain.py --size base --steps 20 --workers 2 --batch-size 32

Timing: `fit` runs with `log_every=1`, so its `log` callback reports every step's samples and samples/s,
measured from the end of the previous step to the end of this one (waiting for the batch, the step and the
loss logging included). The first `--warmup` steps are dropped, which excludes the DataLoader start-up (worker
spawn, the shuffle buffer filling) and the first, slow steps; the rest are summed: samples / seconds. Workers
keep prefetching during the warm-up (up to 4 batches each), so the first timed steps may find batches waiting:
time enough steps. On a shared machine, `--repeat N` alternates the two timings N times and keeps the best of
each (the runs are printed too).

Models are random (a BLIP-2 vision tower saved like `capfilt.testing`'s and the synthetic world's tokenizer),
so the numbers measure throughput only. `tiny` (tower 32 wide, 32 px) is where loading weighs most; `base`
(tower 256 wide, 4 layers, 224 px; Q-Former 256 wide, 4 layers, 32 queries) a size where compute matters.
The training process runs `--threads` torch threads (default 1 on a 2-core machine, leaving the decode
workers a core); DataLoader workers always run one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator

from capfilt.data.synth import write_synth
from capfilt.settings import OptimConfig, PretrainConfig, QFormerShape, SynthConfig
from capfilt.testing import build_tiny_qformer_parts
from capfilt.train.parts import build
from capfilt.train.pretrain import fit, shard_batches

KEPT_BATCHES = 16  # in-memory batches, cycled (base: 18 MiB each at batch 32)
# tower: the frozen BLIP-2 vision model; shape: the Q-Former trained on it.
SIZES = {
    "tiny": dict(tower=dict(hidden=32, layers=2, heads=2, image_size=32, patch=8),
                 shape=dict(hidden_size=32, num_layers=2, num_heads=2, num_query_tokens=4, embed_dim=32)),
    "base": dict(tower=dict(hidden=256, layers=4, heads=4, image_size=224, patch=16),
                 shape=dict(hidden_size=256, num_layers=4, num_heads=4, num_query_tokens=32, embed_dim=256)),
}


def save_tower(path: Path, hidden: int, layers: int, heads: int, image_size: int, patch: int, seed: int = 0) -> str:
    """A random BLIP-2 vision tower with its image processor, saved as `build_tiny_qformer_parts` saves its own."""
    from transformers import Blip2VisionConfig, Blip2VisionModel
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    tower = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch, initializer_range=0.02))  # the default (1e-10) is a constant tower
    tower.save_pretrained(path)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def timed_fit(model, batches: Callable[[int], Iterator[dict]], warmup: int, steps: int, seed: int) -> dict:
    """fit `warmup + steps` steps, logging every step; samples/s over the steps after the warm-up."""
    accelerator = Accelerator(cpu=True)
    logged: list[dict] = []
    sources: list[Iterator[dict]] = []

    def source(start: int) -> Iterator[dict]:
        sources.append(batches(start))
        return sources[-1]

    optim = OptimConfig(steps=warmup + steps, warmup_steps=0)
    with contextlib.redirect_stderr(io.StringIO()):  # fit's progress bar
        fit(model, source, optim, accelerator, seed=seed, log_every=1, log=logged.append)
    for it in sources:
        getattr(it, "close", lambda: None)()  # stops the DataLoader workers
    accelerator.free_memory()
    timed = logged[warmup:]
    samples = sum(v["samples"] for v in timed)
    seconds = sum(v["samples"] / v["samples_per_s"] for v in timed)
    return dict(samples=samples, seconds=seconds, per_s=samples / seconds)


def data_only(batches: Iterator[dict], warmup: int, steps: int) -> float:
    """samples/s of the loader alone (same warm-up rule as `timed_fit`)."""
    for _ in range(warmup):
        next(batches)
    samples, start = 0, time.perf_counter()
    for batch in itertools.islice(batches, steps):
        samples += batch["pixel_values"].shape[0]
    return samples / (time.perf_counter() - start)


def bench(size: str, samples: int, workers: int, batch_size: int, warmup: int, steps: int, repeat: int,
          seed: int, root: Path) -> dict:
    root.mkdir(parents=True)
    tower, shape = SIZES[size]["tower"], SIZES[size]["shape"]
    parts_paths = build_tiny_qformer_parts(root / "parts", seed=seed)  # for its tokenizer
    vision = save_tower(root / "vision", **tower, seed=seed)
    corpus = root / "corpus"
    write_synth(corpus, SynthConfig(n=samples, per_shard=max(1, min(10000, samples // 8)),
                                    size=tower["image_size"], seed=seed))
    config = PretrainConfig(stage=1, specs=(str(corpus),), out=str(root / "out"), vision=vision,
                            tokenizer=parts_paths["tokenizer"], shape=QFormerShape(**shape, dropout=0.0),
                            batch_size=batch_size, workers=workers, seed=seed, mixed_precision="no")
    torch.manual_seed(seed)
    parts = build(config, None)
    initial = copy.deepcopy(parts.model.state_dict())
    accelerator = Accelerator(cpu=True)

    # In memory: the same stream without workers, read and tokenized once; skip reports dropped.
    in_process = shard_batches(dataclasses.replace(config, workers=0), parts, accelerator, 0)
    kept = []
    while len(kept) < min(warmup + steps, KEPT_BATCHES):
        batch = next(in_process)
        batch.pop("skipped", None)
        if "pixel_values" in batch:
            kept.append(batch)
    in_process.close()

    memory, end_to_end = [], []
    for _ in range(repeat):  # alternated, so a burst of load elsewhere hits both alike
        parts.model.load_state_dict(initial)
        memory.append(timed_fit(parts.model, lambda start: (dict(b) for b in itertools.cycle(kept)),
                                warmup, steps, seed)["per_s"])
        parts.model.load_state_dict(initial)
        end_to_end.append(timed_fit(parts.model, lambda start: shard_batches(config, parts, accelerator, start),
                                    warmup, steps, seed)["per_s"])
    loader = shard_batches(config, parts, accelerator, 0)
    data_per_s = data_only(loader, warmup, steps)
    loader.close()
    return dict(size=size, workers=workers, batch_size=batch_size, steps=steps,
                params=sum(p.numel() for p in parts.model.parameters() if p.requires_grad),
                memory_per_s=max(memory), end_to_end_per_s=max(end_to_end), data_per_s=data_per_s,
                ratio=max(end_to_end) / max(memory), runs=list(zip(memory, end_to_end)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (DataLoader start-up included)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1024, help="synthetic corpus size (8 shards)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the two timings this many times and keep the best of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="build everything under this new directory and keep it")
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.samples, args.threads, args.repeat, args.warmup) < 1 or args.workers < 0:
        parser.error("--batch-size, --steps, --samples, --threads, --repeat and --warmup must be >= 1, --workers >= 0")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: exists and is not empty")
    torch.set_num_threads(args.threads)
    sizes = list(SIZES) if args.size == "both" else [args.size]
    print("$ python " + shlex.join(sys.argv))
    print(f"torch {torch.__version__}, device cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"thread(s) in the training process, 1 per DataLoader worker; {args.warmup} warm-up + {args.steps} "
          f"timed steps, best of {args.repeat}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'size':<6}{'trainable':>10}{'batch':>7}{'workers':>9}{'in-memory samples/s':>21}"
          f"{'end-to-end samples/s':>22}{'ratio':>7}{'data-only samples/s':>21}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    try:
        for size in sizes:
            r = bench(size, args.samples, args.workers, args.batch_size, args.warmup, args.steps, args.repeat,
                      args.seed, root / size)
            print(f"{r['size']:<6}{r['params'] / 1e6:>9.2f}M{r['batch_size']:>7}{r['workers']:>9}"
                  f"{r['memory_per_s']:>21.1f}{r['end_to_end_per_s']:>22.1f}{r['ratio']:>7.2f}"
                  f"{r['data_per_s']:>21.1f}", flush=True)
            if args.repeat > 1:
                print("      runs (in-memory, end-to-end): "
                      + ", ".join(f"({m:.1f}, {e:.1f})" for m, e in r["runs"]), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
