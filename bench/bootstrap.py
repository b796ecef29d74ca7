"""How fast is `bootstrap`, against its own models, a naive BLIP loop, one process, and in memory?

Four measurements, on the same corpus (copies of the demo shards) and the same random models, one row per size:

ratio   End-to-end `bootstrap` (read tars, decode and preprocess in `--workers` DataLoader workers, caption,
        score, select, write shards; models built beforehand, not timed) against the compute alone: the same
        models on the same batches, already decoded into tensors in memory, after one warm-up batch. 1.0 when
        I/O and decoding are fully hidden. Target >= 0.9.
naive   The loop a BLIP user writes from the Hugging Face model cards, on the first `--naive-images` images:
        per image, the processor and one `generate` (batch of 1, capfilt's generation kwargs and prompt), then
        one full ITM forward per (image, caption) pair (web caption and each synthetic one; `[ENC]` as first
        token, as capfilt's Scorer does), so the vision tower runs 1 + (1 + K) times per image. Timed after one
        warm-up image; reading and JPEG-decoding the images is excluded (done beforehand), which favours the
        naive loop. Reported: end-to-end img/s (above) / naive img/s. Target >= 3x.
procs   `run_job(..., processes=2)` against `processes=1`, both with `workers=0` (decoding in the process itself,
        so a process is one core's work) and a fresh output directory. Each spawned child sets
        cpu_count // 2 torch threads; the one-process run gets the same (1 on a 2-core machine: one thread
        each). Wall time around the call, so it includes building the models and, for 2 processes, spawning
        them and importing torch there; the log line also gives the run loop's own time (the slowest
        process's). Work is split by shard, so the corpus needs several. Target >= 1.8x.
rss     Peak resident memory of an end-to-end `bootstrap` in a fresh process (`--rss-child`), on the corpus and
        on one 10x its size: the child's ru_maxrss plus, with workers, `--workers` times the largest worker's
        (RUSAGE_CHILDREN): an upper bound, since workers share pages with their parent. Target: flat (10x/1x
        <= 1.1), as the reader streams.

    python bench/bootstrap.py                     # both model sizes, all parts, demo corpus x4
    python bench/bootstrap.py --size base --copies 8 --workers 2 --batch-size 16 --parts ratio,naive

Models are random (`capfilt.testing`), so the numbers measure throughput only; `base` is a size where compute
matters (hidden 256, 4 layers, 224 px), `tiny` one where I/O dominates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from capfilt.captioner import Captioner, CaptionerConfig
from capfilt.distributor import run_job
from capfilt.pipeline import RunConfig, batch_seed, run, shared_transforms
from capfilt.reader import Batch, ShardStream, decode_image, expand_specs, read_shard
from capfilt.scorer import Scorer, ScorerConfig, enc_token_id
from capfilt.selection import SelectionConfig
from capfilt.testing import build_tiny_models

SIZES = {"tiny": dict(hidden=32, layers=2, image_size=32, patch=8),
         "base": dict(hidden=256, layers=4, image_size=224, patch=16)}
PARTS = ("ratio", "naive", "procs", "rss")
RSS_SCALE = 10
DEMO = Path(__file__).resolve().parents[1] / "shards"


def make_corpus(root: Path, copies: int) -> Path:
    corpus = root / f"corpus-x{copies}"
    corpus.mkdir()
    for copy in range(copies):
        for shard in sorted(DEMO.glob("demo-*.tar")):
            shutil.copy(shard, corpus / f"{shard.stem}-{copy:03d}.tar")
    return corpus


def run_config(corpus: Path, root: Path, args, workers: int) -> RunConfig:
    return RunConfig(specs=(str(corpus),), out=tempfile.mkdtemp(prefix="out-", dir=root),
                     batch_size=args.batch_size, workers=workers, seed=0, progress=False)


def compute_only(batches: list[Batch], captioner: Captioner, scorer: Scorer, keys) -> float:
    start = time.perf_counter()
    for batch in batches:
        good = [s for s in batch.samples if s.error is None]
        captions = captioner(batch.pixels[keys[0]], seed=batch_seed(0, batch.shard, batch.index))
        scorer(batch.pixels[keys[1]], [[s.web_caption, *c] for s, c in zip(good, captions)])
    return time.perf_counter() - start


@torch.inference_mode()
def naive_loop(corpus: Path, models: dict, captioner: Captioner, scorer: Scorer, n: int) -> tuple[int, float]:
    samples = (s for url in expand_specs([str(corpus)]) for s in read_shard(url) if s.error is None)
    images = [(decode_image(s.image), s.web_caption) for s in itertools.islice(samples, n)]
    cap_model = BlipForConditionalGeneration.from_pretrained(models["blip_captioner"]).eval()
    cap_processor = BlipProcessor.from_pretrained(models["blip_captioner"])
    itm_model = BlipForImageTextRetrieval.from_pretrained(models["blip_itm"]).eval()
    itm_processor = BlipProcessor.from_pretrained(models["blip_itm"])
    enc = enc_token_id(itm_processor.tokenizer, itm_model.config.text_config.vocab_size)
    kwargs = captioner.config.generation_kwargs(prompt_tokens=len(captioner.prefix))

    def one(image, web_caption) -> list[float]:
        inputs = cap_processor(images=image, text=captioner.prompt, return_tensors="pt")
        out = cap_model.generate(**inputs, **kwargs)
        texts = cap_processor.batch_decode(out, skip_special_tokens=True)
        captions = [t.removeprefix(captioner.prompt.strip()).strip() for t in texts]
        scores = []
        for text in [web_caption, *captions]:
            inputs = itm_processor(images=image, text=text, truncation=True, max_length=scorer.max_text_length,
                                   return_tensors="pt")
            inputs["input_ids"][:, 0] = enc
            scores.append(itm_model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[0, 1].item())
        return scores

    one(*images[0])  # warm-up
    torch.manual_seed(0)
    start = time.perf_counter()
    for image, web_caption in images:
        one(image, web_caption)
    return len(images), time.perf_counter() - start


def with_processes(corpus: Path, root: Path, models: dict, args, processes: int) -> tuple[int, float, float]:
    config = run_config(corpus, root, args, workers=0)
    start = time.perf_counter()
    summary = run_job(config, CaptionerConfig(model=models["blip_captioner"], num_captions=args.num_captions),
                      ScorerConfig(model=models["blip_itm"]), SelectionConfig(), processes=processes)
    return summary.samples, time.perf_counter() - start, summary.duration_s


def peak_rss_mib(corpus: Path, root: Path, models: dict, args) -> float:
    out = tempfile.mkdtemp(prefix="out-", dir=root)
    command = [sys.executable, __file__, "--rss-child", str(corpus), out, models["blip_captioner"], models["blip_itm"],
               "--workers", str(args.workers), "--batch-size", str(args.batch_size),
               "--num-captions", str(args.num_captions)]
    child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)  # stderr shows a failure
    return json.loads(child.stdout.splitlines()[-1])["peak_kib"] / 1024


def rss_child(args) -> None:
    corpus, out, captioner, itm = args.rss_child
    config = RunConfig(specs=(corpus,), out=out, batch_size=args.batch_size, workers=args.workers, seed=0,
                       progress=False)
    run_job(config, CaptionerConfig(model=captioner, num_captions=args.num_captions), ScorerConfig(model=itm),
            SelectionConfig())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest joined DataLoader worker
    print(json.dumps({"peak_kib": own + args.workers * worker}))


def bench(size: str, args, parts: set[str]) -> dict:
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    row: dict = dict(size=size)
    try:
        models = build_tiny_models(root / "models", **SIZES[size])
        corpus = make_corpus(root, args.copies)
        shards = len(expand_specs([str(corpus)]))
        if parts & {"ratio", "naive"}:  # the naive loop is compared with the end-to-end run
            captioner = Captioner(CaptionerConfig(model=models["blip_captioner"], num_captions=args.num_captions))
            scorer = Scorer(ScorerConfig(model=models["blip_itm"]))
            transforms, *keys = shared_transforms(captioner, scorer)
            batches = [b for b in ShardStream(expand_specs([str(corpus)]), transforms, args.batch_size)
                       if isinstance(b, Batch)]
            row["images"] = sum(len(b.samples) for b in batches)
            compute_only(batches[:1], captioner, scorer, keys)  # warm-up, for the end-to-end run too
            if "ratio" in parts:
                compute_s = compute_only(batches, captioner, scorer, keys)
                row["compute"] = row["images"] / compute_s
            start = time.perf_counter()
            summary = run(run_config(corpus, root, args, args.workers), captioner, scorer, SelectionConfig())
            end_to_end_s = time.perf_counter() - start
            assert summary.samples == row["images"]
            row["e2e"] = row["images"] / end_to_end_s
            if "ratio" in parts:
                row["ratio"] = compute_s / end_to_end_s
            print(f"{size}: end-to-end {row['images']} images ({shards} shards) in {end_to_end_s:.1f} s, "
                  f"{args.workers} workers, {torch.get_num_threads()} torch threads", flush=True)
            if "naive" in parts:
                n, naive_s = naive_loop(corpus, models, captioner, scorer, args.naive_images)
                row.update(naive=n / naive_s, vs_naive=row["e2e"] * naive_s / n)
                print(f"{size}: naive loop {n} images in {naive_s:.1f} s", flush=True)
        if "procs" in parts:
            threads = torch.get_num_threads()
            # The same torch threads as each of the 2 children, so the comparison is one core set against two.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
            try:
                samples, one_s, one_loop_s = with_processes(corpus, root, models, args, 1)
            finally:
                torch.set_num_threads(threads)
            samples_2, two_s, two_loop_s = with_processes(corpus, root, models, args, 2)
            assert samples == samples_2
            row.setdefault("images", samples)
            row.update(proc1=samples / one_s, proc2=samples / two_s, speedup=one_s / two_s)
            print(f"{size}: workers 0, 1 process {one_s:.1f} s wall (run loop {one_loop_s:.1f} s), 2 processes "
                  f"{two_s:.1f} s wall (slowest run loop {two_loop_s:.1f} s): {one_loop_s / two_loop_s:.2f}x "
                  f"without start-up", flush=True)
        if "rss" in parts:
            row["rss1"] = peak_rss_mib(corpus, root, models, args)
            row["rss10"] = peak_rss_mib(make_corpus(root, RSS_SCALE * args.copies), root, models, args)
            row["rss_ratio"] = row["rss10"] / row["rss1"]
            print(f"{size}: peak RSS {row['rss1']:.0f} MiB ({shards} shards), {row['rss10']:.0f} MiB "
                  f"({RSS_SCALE * shards} shards), {args.workers} workers", flush=True)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(rows: list[dict]) -> str:
    columns = [("size", "size", "{}", None), ("images", "images", "{}", None),
               ("e2e img/s", "e2e", "{:.1f}", None), ("compute img/s", "compute", "{:.1f}", None),
               ("ratio (>= 0.9)", "ratio", "{:.2f}", lambda x: x >= 0.9),
               ("naive img/s", "naive", "{:.1f}", None),
               ("vs naive (>= 3x)", "vs_naive", "{:.1f}x", lambda x: x >= 3),
               ("1 proc img/s", "proc1", "{:.1f}", None), ("2 procs img/s", "proc2", "{:.1f}", None),
               ("speed-up (>= 1.8x)", "speedup", "{:.2f}x", lambda x: x >= 1.8),
               ("RSS 1x MiB", "rss1", "{:.0f}", None), (f"RSS {RSS_SCALE}x MiB", "rss10", "{:.0f}", None),
               (f"{RSS_SCALE}x / 1x (<= 1.1)", "rss_ratio", "{:.2f}", lambda x: x <= 1.1)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt, target in columns:
            if key not in row:
                cells.append("-")
                continue
            cells.append(fmt.format(row[key]) + ("" if target is None else " ok" if target(row[key]) else " MISS"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--copies", type=int, default=4, help="demo corpus copies (4 shards, 80 images each)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (not for procs: 0 there)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-captions", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--naive-images", type=int, default=32, help="images timed in the naive loop")
    parser.add_argument("--rss-child", nargs=4, metavar=("CORPUS", "OUT", "CAPTIONER", "ITM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    sizes = list(SIZES) if args.size == "both" else [args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device cpu, "
          f"batch {args.batch_size}, {args.num_captions} caption(s) per image", flush=True)
    rows = [bench(size, args, parts) for size in sizes]
    print(table(rows))


if __name__ == "__main__":
    main()
