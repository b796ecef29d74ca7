"""How fast is `bootstrap`, against its own models, a naive BLIP loop, one process, and in memory?

Five measurements (the fifth, tower, on request), on the same corpus (copies of the demo shards) and the same random
models, one row per size and batch size:

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
        them and importing torch there (about 5 s on 2 cores); the log line also gives the run loop's own time
        (the slowest process's). Work is split by shard, so the corpus needs several: `--procs-copies` of the
        demo shards (default 16: 1,280 images, 64 shards). Target >= 1.8x.
rss     Peak resident memory of an end-to-end `bootstrap` in a fresh process (`--rss-child`), on the corpus and
        on one 10x its size: the child's ru_maxrss plus, with workers, `--workers` times the largest worker's
        (RUSAGE_CHILDREN): an upper bound, since workers share pages with their parent. Target: flat (10x/1x
        <= 1.1), as the reader streams.

    python bench/bootstrap.py                     # tiny and base, all parts, demo corpus x4
    python bench/bootstrap.py --size base --copies 8 --workers 2 --batch-size 16 --parts ratio,naive
    python bench/bootstrap.py --size blip-base --dtype bf16 --batch-size 16,32,64,128 --copies 16 --workers 8 \
        --parts ratio,naive                       # on a GPU: images/s, GPU memory, ratio per batch size

vlm     A tiny VLM captioner (`--vlm`, default qwen2_vl; built by `capfilt.testing.build_vlm` from the real Hub
        files in tests/hub_files, depth and width shrunk) with a tiny SigLIP filter (`build_dual_encoders`, from
        siglip-so400m-patch14-384's real files, 384 px): end-to-end against compute-only, as ratio. Beside it,
        the captioner's own processor (the real preprocessing settings: Qwen2-VL's dynamic resolution and
        patching, Idefics3's 512 px crops), the SigLIP filter's and BLIP's transform, each in img/s on one
        core (one torch thread, as a DataLoader worker has), over `--naive-images` demo photos: how many worker
        cores a GPU generating at a given rate needs. Not in the default parts.

tower   BLIP-2's pair on one frozen tower (a captioner, and a filter given the captioner's tower weights, as
        BLIP-2's stage-1 filter and stage-2 captioner are): compute-only img/s with the tower shared (once per
        batch, as `bootstrap` does) against two separate copies of it. Not in the default parts.

Models are random (`capfilt.testing`), so the numbers measure throughput only; `base` is a size where compute
matters (hidden 256, 4 layers, 224 px), `tiny` one where I/O dominates, `blip-base` has BLIP-base's shapes
(ViT-B/16 at 384 px, BERT-base with its 30,524-token vocabulary), so its compute is the real checkpoint's
(random captions run to the maximum length, so if anything it overstates the decoding work).
"""

from __future__ import annotations

import argparse
import contextlib
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

from capfilt.bootstrap.launch import run_job
from capfilt.bootstrap.pipeline import batch_seed, run, shared_preprocessors
from capfilt.data.reader import Batch, ShardStream, decode_image, expand_specs, read_shard
from capfilt.models.captioner import Captioner, load_captioner
from capfilt.models.scorer import Scorer, enc_token_id
from capfilt.models.towers import one_tower_pass, same_vision_tower
from capfilt.settings import CaptionerConfig, RunConfig, ScorerConfig, SelectionConfig
from capfilt.testing import (
    QWEN2_VL_INSTRUCT_TEMPLATE,
    VLM_FILES,
    blip2_filter_on_captioner_tower,
    build_dual_encoders,
    build_tiny_models,
    build_vlm,
)

SIZES = {"tiny": dict(hidden=32, layers=2, image_size=32, patch=8),
         "base": dict(hidden=256, layers=4, image_size=224, patch=16),
         # BLIP-base (Salesforce/blip-image-captioning-base, blip-itm-base-coco): ViT-B/16 at 384 px, BERT-base.
         "blip-base": dict(hidden=768, layers=12, image_size=384, patch=16, vocab_size=30524)}
PARTS = ("ratio", "naive", "procs", "rss", "tower", "vlm")
RSS_SCALE = 10
DEMO = Path(__file__).resolve().parents[1] / "shards"
HUB_FILES = Path(__file__).resolve().parents[1] / "tests" / "hub_files"


def make_corpus(root: Path, copies: int) -> Path:
    corpus = root / f"corpus-x{copies}"
    corpus.mkdir()
    for copy in range(copies):
        for shard in sorted(DEMO.glob("demo-*.tar")):
            shutil.copy(shard, corpus / f"{shard.stem}-{copy:03d}.tar")
    return corpus


def run_config(corpus: Path, root: Path, workers: int, batch_size: int) -> RunConfig:
    return RunConfig(specs=(str(corpus),), out=tempfile.mkdtemp(prefix="out-", dir=root),
                     batch_size=batch_size, workers=workers, seed=0, progress=False)


def model_configs(models: dict, args) -> tuple[CaptionerConfig, ScorerConfig]:
    return (CaptionerConfig(model=models["blip_captioner"], num_captions=args.num_captions, device=args.device,
                            dtype=args.dtype),
            ScorerConfig(model=models["blip_itm"], device=args.device, dtype=args.dtype))


def compute_only(batches: list[Batch], captioner: Captioner, scorer: Scorer, keys, one_tower: bool = False) -> float:
    start = time.perf_counter()
    for batch in batches:
        good = [s for s in batch.samples if s.error is None]
        with one_tower_pass(captioner.model, scorer.model) if one_tower else contextlib.nullcontext():
            captions = captioner(batch.inputs[keys[0]], seed=batch_seed(0, batch.shard, batch.index))
            scorer(batch.inputs[keys[1]], [[s.web_caption, *c] for s, c in zip(good, captions)])
    return time.perf_counter() - start


@torch.inference_mode()
def naive_loop(corpus: Path, models: dict, captioner: Captioner, scorer: Scorer, n: int) -> tuple[int, float]:
    samples = (s for url in expand_specs([str(corpus)]) for s in read_shard(url) if s.error is None)
    images = [(decode_image(s.image), s.web_caption) for s in itertools.islice(samples, n)]
    device, dtype = captioner.device, captioner.model.dtype  # as a user would: the whole model moved and cast
    cap_model = BlipForConditionalGeneration.from_pretrained(models["blip_captioner"], dtype=dtype).to(device).eval()
    cap_processor = BlipProcessor.from_pretrained(models["blip_captioner"])
    itm_model = BlipForImageTextRetrieval.from_pretrained(models["blip_itm"], dtype=dtype).to(device).eval()
    itm_processor = BlipProcessor.from_pretrained(models["blip_itm"])
    enc = enc_token_id(itm_processor.tokenizer, itm_model.config.text_config)
    kwargs = captioner.config.generation_kwargs(prompt_tokens=len(captioner.prefix))

    def one(image, web_caption) -> list[float]:
        inputs = cap_processor(images=image, text=captioner.prompt, return_tensors="pt").to(device)
        out = cap_model.generate(**inputs.to(dtype), **kwargs)
        texts = cap_processor.batch_decode(out, skip_special_tokens=True)
        captions = [t.removeprefix(captioner.prompt.strip()).strip() for t in texts]
        scores = []
        for text in [web_caption, *captions]:
            inputs = itm_processor(images=image, text=text, truncation=True, max_length=scorer.max_text_length,
                                   return_tensors="pt").to(device).to(dtype)
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
    config = run_config(corpus, root, workers=0, batch_size=args.batch_size[0])
    start = time.perf_counter()
    summary = run_job(config, *model_configs(models, args), SelectionConfig(), processes=processes)
    return summary.samples, time.perf_counter() - start, summary.duration_s


def peak_rss_mib(corpus: Path, root: Path, models: dict, args) -> float:
    out = tempfile.mkdtemp(prefix="out-", dir=root)
    command = [sys.executable, __file__, "--rss-child", str(corpus), out, models["blip_captioner"], models["blip_itm"],
               "--workers", str(args.workers), "--batch-size", str(args.batch_size[0]),
               "--num-captions", str(args.num_captions), "--device", args.device, "--dtype", args.dtype]
    child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)  # stderr shows a failure
    return json.loads(child.stdout.splitlines()[-1])["peak_kib"] / 1024


def rss_child(args) -> None:
    corpus, out, captioner, itm = args.rss_child
    config = RunConfig(specs=(corpus,), out=out, batch_size=args.batch_size[0], workers=args.workers, seed=0,
                       progress=False)
    run_job(config, *model_configs({"blip_captioner": captioner, "blip_itm": itm}, args), SelectionConfig())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest joined DataLoader worker
    print(json.dumps({"peak_kib": own + args.workers * worker}))


def bench(size: str, args, parts: set[str]) -> list[dict]:
    """One row per batch size for ratio and naive; procs and rss (first batch size) join the first row."""
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    rows = [dict(size=size, batch=b) for b in args.batch_size]
    try:
        models = build_tiny_models(root / "models", **SIZES[size], blip2=False)
        corpus = make_corpus(root, args.copies)
        shards = len(expand_specs([str(corpus)]))
        if parts & {"ratio", "naive"}:  # the naive loop is compared with the end-to-end run
            captioner_config, scorer_config = model_configs(models, args)
            captioner, scorer = Captioner(captioner_config), Scorer(scorer_config)
            for row in rows:
                ratio_and_naive(row, corpus, root, models, captioner, scorer, args, parts)
            del captioner, scorer
        row = rows[0]
        if "procs" in parts:
            procs_corpus = corpus if args.procs_copies == args.copies else make_corpus(root, args.procs_copies)
            threads = torch.get_num_threads()
            # The same torch threads as each of the 2 children, so the comparison is one core set against two.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
            try:
                samples, one_s, one_loop_s = with_processes(procs_corpus, root, models, args, 1)
            finally:
                torch.set_num_threads(threads)
            samples_2, two_s, two_loop_s = with_processes(procs_corpus, root, models, args, 2)
            assert samples == samples_2
            row.update(procs_images=samples, proc1=samples / one_s, proc2=samples / two_s, speedup=one_s / two_s)
            print(f"{size}: {samples} images, workers 0, 1 process {one_s:.1f} s wall (run loop {one_loop_s:.1f} s), "
                  f"2 processes {two_s:.1f} s wall (slowest run loop {two_loop_s:.1f} s): "
                  f"{one_loop_s / two_loop_s:.2f}x without start-up", flush=True)
        if "tower" in parts:
            shared_tower(row, corpus, root, args)
        if "vlm" in parts:
            rows.append(vlm_captioner(dict(size=f"{size} filter, {args.vlm}", batch=args.batch_size[0]), corpus,
                                      root, models, args))
        if "rss" in parts:
            row["rss1"] = peak_rss_mib(corpus, root, models, args)
            row["rss10"] = peak_rss_mib(make_corpus(root, RSS_SCALE * args.copies), root, models, args)
            row["rss_ratio"] = row["rss10"] / row["rss1"]
            print(f"{size}: peak RSS {row['rss1']:.0f} MiB ({shards} shards), {row['rss10']:.0f} MiB "
                  f"({RSS_SCALE * shards} shards), {args.workers} workers", flush=True)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def shared_tower(row: dict, corpus: Path, root: Path, args) -> None:
    models = build_tiny_models(root / "blip2", **SIZES[row["size"]])
    same = blip2_filter_on_captioner_tower(models, root / "blip2" / "itm-same-tower")
    captioner = Captioner(CaptionerConfig(model=models["blip2_captioner"], num_captions=args.num_captions,
                                          device=args.device, dtype=args.dtype))
    scorer = Scorer(ScorerConfig(model=same, device=args.device, dtype=args.dtype))
    assert same_vision_tower(captioner.model, scorer.model)
    preprocessors, *keys = shared_preprocessors(captioner, scorer)
    batches = [b for b in ShardStream(expand_specs([str(corpus)]), preprocessors, row["batch"]) if isinstance(b, Batch)]
    images, speeds = sum(len(b.samples) for b in batches), {}
    for shared in (False, True):  # one_tower_pass restores the pair after each batch: the same models serve both
        compute_only(batches[:1], captioner, scorer, keys, shared)  # warm-up
        speeds[shared] = images / compute_only(batches, captioner, scorer, keys, shared)
    row.update(tower_separate=speeds[False], tower_shared=speeds[True])
    print(f"{row['size']}: BLIP-2 pair, compute-only {speeds[False]:.1f} img/s with two towers, "
          f"{speeds[True]:.1f} img/s with one shared: {speeds[True] / speeds[False]:.2f}x", flush=True)


def vlm_captioner(row: dict, corpus: Path, root: Path, models: dict, args) -> dict:
    template = QWEN2_VL_INSTRUCT_TEMPLATE if args.vlm == "qwen2_vl" else None  # the files are the base model's
    path = build_vlm(HUB_FILES, args.vlm, root / "vlm", chat_template=template)
    captioner = load_captioner(CaptionerConfig(model=path, num_captions=args.num_captions, device=args.device,
                                               dtype=args.dtype, max_new_tokens=args.max_new_tokens))
    siglip = build_dual_encoders(HUB_FILES, root / "dual")["siglip"]
    scorer = Scorer(ScorerConfig(model=siglip, device=args.device, dtype=args.dtype))
    blip = Scorer(ScorerConfig(model=models["blip_itm"], device=args.device, dtype=args.dtype))
    ratio_and_naive(row, corpus, root, models, captioner, scorer, args, {"ratio"})
    samples = (s for url in expand_specs([str(corpus)]) for s in read_shard(url) if s.error is None)
    images = [decode_image(s.image) for s in itertools.islice(samples, args.naive_images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for key, preprocess in (("vlm_pre", captioner.preprocess), ("siglip_pre", scorer.preprocess),
                                ("blip_pre", blip.preprocess)):
            preprocess(images[0])  # warm-up
            start = time.perf_counter()
            for image in images:
                preprocess(image)
            row[key] = len(images) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"{row['size']}: captioner's processor {row['vlm_pre']:.1f} img/s per core, SigLIP's "
          f"{row['siglip_pre']:.1f}, BLIP's transform {row['blip_pre']:.1f} ({len(images)} photos)", flush=True)
    return row


def ratio_and_naive(row: dict, corpus: Path, root: Path, models: dict, captioner: Captioner, scorer: Scorer, args,
                    parts: set[str]) -> None:
    preprocessors, *keys = shared_preprocessors(captioner, scorer)
    batches = [b for b in ShardStream(expand_specs([str(corpus)]), preprocessors, row["batch"]) if isinstance(b, Batch)]
    row["images"] = sum(len(b.samples) for b in batches)
    # Warm-up over every batch, for the end-to-end run too: kernels are set up per input shape, and a VLM's
    # shapes vary with each batch's images and prompts (a first pass over the tiny Qwen2-VL took 3.5x the second).
    compute_only(batches, captioner, scorer, keys)
    if "ratio" in parts:
        compute_s = compute_only(batches, captioner, scorer, keys)
        row["compute"] = row["images"] / compute_s
    cuda = captioner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(captioner.device)
    start = time.perf_counter()
    summary = run(run_config(corpus, root, args.workers, row["batch"]), captioner, scorer, SelectionConfig())
    row["e2e_s"] = time.perf_counter() - start
    assert summary.samples == row["images"]
    row["e2e"] = row["images"] / row["e2e_s"]
    if cuda:
        row["gpu_gib"] = torch.cuda.max_memory_allocated(captioner.device) / 2**30
    if "ratio" in parts:
        row["ratio"] = compute_s / row["e2e_s"]
    print(f"{row['size']}: batch {row['batch']}: end-to-end {row['images']} images in {row['e2e_s']:.1f} s, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads, {captioner.device}, {args.dtype}",
          flush=True)
    if "naive" in parts:
        n, naive_s = naive_loop(corpus, models, captioner, scorer, args.naive_images)
        row.update(naive=n / naive_s, vs_naive=row["e2e"] * naive_s / n)
        print(f"{row['size']}: naive loop {n} images in {naive_s:.1f} s", flush=True)


def table(rows: list[dict]) -> str:
    columns = [("size", "size", "{}", None), ("batch", "batch", "{}", None), ("images", "images", "{}", None),
               ("e2e img/s", "e2e", "{:.1f}", None), ("compute img/s", "compute", "{:.1f}", None),
               ("ratio (>= 0.9)", "ratio", "{:.2f}", lambda x: x >= 0.9), ("GPU GiB", "gpu_gib", "{:.1f}", None),
               ("naive img/s", "naive", "{:.1f}", None),
               ("vs naive (>= 3x)", "vs_naive", "{:.1f}x", lambda x: x >= 3),
               ("procs images", "procs_images", "{}", None), ("1 proc img/s", "proc1", "{:.1f}", None),
               ("2 procs img/s", "proc2", "{:.1f}", None),
               ("speed-up (>= 1.8x)", "speedup", "{:.2f}x", lambda x: x >= 1.8),
               ("RSS 1x MiB", "rss1", "{:.0f}", None), (f"RSS {RSS_SCALE}x MiB", "rss10", "{:.0f}", None),
               (f"{RSS_SCALE}x / 1x (<= 1.1)", "rss_ratio", "{:.2f}", lambda x: x <= 1.1),
               ("BLIP-2 2 towers img/s", "tower_separate", "{:.1f}", None),
               ("1 shared tower img/s", "tower_shared", "{:.1f}", None),
               ("VLM processor img/s/core", "vlm_pre", "{:.1f}", None),
               ("SigLIP processor img/s/core", "siglip_pre", "{:.1f}", None),
               ("BLIP transform img/s/core", "blip_pre", "{:.1f}", None)]
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
    parser.add_argument("--procs-copies", type=int, default=16,
                        help="demo corpus copies for procs: a job long enough that starting the processes (~5 s) "
                             "is amortised as in a real one")
    parser.add_argument("--batch-size", type=lambda v: [int(b) for b in v.split(",")], default=[16],
                        help="images per batch; a comma-separated list gives ratio and naive one row each")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cpu, cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--num-captions", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS[:4]), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--naive-images", type=int, default=32, help="images timed in the naive loop (and the "
                                                                     "processors, part vlm)")
    parser.add_argument("--vlm", choices=[t for t in VLM_FILES if t != "florence2"], default="qwen2_vl",
                        help="the VLM family of part vlm")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="part vlm: tokens per caption")
    parser.add_argument("--rss-child", nargs=4, metavar=("CORPUS", "OUT", "CAPTIONER", "ITM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    sizes = ["tiny", "base"] if args.size == "both" else [args.size]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "no GPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {gpu}, "
          f"{args.dtype}, batch {args.batch_size}, {args.num_captions} caption(s) per image", flush=True)
    rows = [row for size in sizes for row in bench(size, args, parts)]
    print(table([row for row in rows if row.keys() - {"size", "batch"}]))  # not the empty rows of part vlm alone


if __name__ == "__main__":
    main()
