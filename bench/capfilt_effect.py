"""BLIP's Table 1 in miniature: does bootstrapping the corpus make pre-training better?

For each seed, on the synthetic world (`capfilt.data.synth`, one coloured shape per 32 px image, captions like "a red
circle at the top left"):

    raw       a web-like corpus with planted noise (default 30%: those captions belong to another image)
    clean     a small, separate, noise-free subset: the stand-in for COCO, on which BLIP fine-tunes its
              captioner and filter
    test      held-out clean pairs for evaluation

A tiny Q-Former trained on `clean` serves as the filter (its ITM head) and as the captioner (its ITG decoder,
BLIP's nucleus sampling). `capfilt filter` and `capfilt bootstrap` turn `raw` into two cleaned corpora, and the
same tiny Q-Former is then pre-trained, from the same initial weights and for the same number of steps, on
each of the three corpora:

    raw                    the noisy corpus as it is
    filtered               web captions the filter rejects removed (images with nothing left dropped)
    captioned + filtered   BLIP's CapFilt: a synthetic caption per image, and the filter applied to both

Reported per corpus, mean ± standard deviation over the seeds: held-out ITC retrieval recall@1/@5 (image to
text and text to image; a retrieved caption identical to the right one counts as a hit, since the world has
only 216 distinct captions) and the held-out ITG caption loss. Reported for the filter: precision and recall of
its web-caption removals against the planted noise.

    python bench/capfilt_effect.py                       # 3 seeds, about 30 min on a 2-core CPU
    python bench/capfilt_effect.py --seeds 1 --steps 300 --filter-steps 500   # a quick look

Everything runs through the library's own entry points (`pretrain`, `run`, `evaluate.run`), on CPU, one torch
thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from capfilt.bootstrap.pipeline import run
from capfilt.bootstrap.truth import noise_report  # noqa: E402
from capfilt.data.reader import read_shard  # noqa: E402
from capfilt.data.synth import write_synth
from capfilt.models.captioner import Captioner  # noqa: E402
from capfilt.models.scorer import Scorer  # noqa: E402
from capfilt.settings import (  # noqa: E402
    CaptionerConfig,
    EvalConfig,  # noqa: E402
    OptimConfig,
    PretrainConfig,
    QFormerShape,  # noqa: E402
    RunConfig,  # noqa: E402
    ScorerConfig,
    SynthConfig,  # noqa: E402
)
from capfilt.testing import build_tiny_qformer_parts  # noqa: E402
from capfilt.train.evaluate import run as evaluate
from capfilt.train.pretrain import pretrain

# The test suite's tiny Q-Former: from scratch, a wide init and a high lr are what get ITM learning in minutes.
SHAPE = QFormerShape(hidden_size=32, num_layers=2, num_heads=2, num_query_tokens=4, embed_dim=16, dropout=0.0,
                     initializer_range=0.3)
CORPORA = ("raw", "filtered", "captioned + filtered")


def train(specs: list[str], out: Path, parts: dict[str, str], steps: int, seed: int) -> Path:
    if not (out / "config.json").exists():
        pretrain(PretrainConfig(
            stage=1, specs=tuple(specs), out=str(out), vision=parts["vision"], tokenizer=parts["tokenizer"],
            shape=SHAPE, optim=OptimConfig(steps=steps, lr=5e-3, min_lr=5e-4, warmup_steps=10), batch_size=32,
            mixed_precision="no", save_every=steps, log_every=max(1, steps // 5), workers=0, shuffle_buffer=500,
            seed=seed))
    return out


def caption_truth(raw: list[str], cleaned: Path) -> dict[str, float]:
    """How right the cleaned corpus's captions are, against each image's true caption (json synth.true_caption):
    the share of kept captions that are true, and of synthetic captions made and kept."""
    truth = {s.key: s.meta["synth"]["true_caption"] for url in raw for s in read_shard(url)}
    kept, made, made_kept = [0, 0], [0, 0], [0, 0]
    for path in sorted(cleaned.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            true = truth[row["key"]]
            for caption in row["kept_captions"] or []:
                kept[0] += caption == true
                kept[1] += 1
            for caption in row["synthetic_captions"] or []:
                made[0] += caption == true
                made[1] += 1
                if caption in (row["kept_captions"] or []):
                    made_kept[0] += caption == true
                    made_kept[1] += 1
    share = lambda c: c[0] / c[1] if c[1] else float("nan")  # noqa: E731
    return {"kept_true": share(kept), "synthetic_true": share(made), "synthetic_kept_true": share(made_kept),
            "kept_per_image": kept[1] / max(1, sum(1 for _ in truth))}


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    root = Path(args.out) / f"seed-{seed}"
    parts = build_tiny_qformer_parts(root / "parts", seed=seed)
    data = {}
    for name, n, noise in (("raw", args.raw, args.noise), ("clean", args.clean, 0.0), ("test", args.test, 0.0)):
        data[name] = root / name
        if not data[name].exists():
            write_synth(data[name], SynthConfig(n=n, per_shard=1000, size=32, max_shapes=1, noise=noise,
                                                seed=1000 * seed + {"raw": 1, "clean": 2, "test": 3}[name]))
    shards = {name: sorted(str(p) for p in path.glob("*.tar")) for name, path in data.items()}

    t0 = time.perf_counter()
    model = train(shards["clean"], root / "captioner-filter", parts, args.filter_steps, seed)
    scorer = Scorer(ScorerConfig(model=str(model), device="cpu"))
    captioner = Captioner(CaptionerConfig(model=str(model), sampling=args.sampling, num_captions=1, min_length=3,
                                          device="cpu"))
    capfilt_dir = "capfilt" if args.sampling == "nucleus" else f"capfilt-{args.sampling}"
    cleaned = {"filtered": root / "filtered", "captioned + filtered": root / capfilt_dir}
    run(RunConfig(specs=tuple(shards["raw"]), out=str(cleaned["filtered"]), workers=0, seed=seed, progress=False),
        None, scorer)
    run(RunConfig(specs=tuple(shards["raw"]), out=str(cleaned["captioned + filtered"]), workers=0, seed=seed,
                  progress=False), captioner, scorer)
    noise = noise_report(shards["raw"], cleaned["filtered"], lambda meta: meta["synth"]["noisy"])
    result = {"seed": seed, "filter_precision": noise.precision, "filter_recall": noise.recall,
              "noise": noise.format(), "corpora": {},
              "captions": {corpus: caption_truth(shards["raw"], path) for corpus, path in cleaned.items()}}
    print(f"seed {seed}: captions against the truth {json.dumps(result['captions'])}", flush=True)
    print(f"seed {seed}: captioner + filter ready in {time.perf_counter() - t0:.0f} s\n{noise.format()}", flush=True)

    for corpus in CORPORA:
        specs = shards["raw"] if corpus == "raw" else sorted(str(p) for p in cleaned[corpus].glob("*.tar"))
        suffix = f"-{args.sampling}" if corpus == "captioned + filtered" and args.sampling != "nucleus" else ""
        run_dir = train(specs, root / f"pretrain-{corpus.replace(' + ', '-')}{suffix}", parts, args.steps, seed)
        report = evaluate(EvalConfig(model=str(run_dir), specs=tuple(shards["test"]), workers=0, device="cpu"))
        result["corpora"][corpus] = {"i2t_r1": report.image_to_text[1], "i2t_r5": report.image_to_text[5],
                                     "t2i_r1": report.text_to_image[1], "t2i_r5": report.text_to_image[5],
                                     "itg_loss": report.itg_loss}
        print(f"seed {seed} {corpus}: {json.dumps(result['corpora'][corpus])}", flush=True)
    return result


def table(results: list[dict]) -> str:
    def cell(values: list[float], digits: int = 3) -> str:
        if any(v != v for v in values):  # NaN: nothing to measure (no synthetic captions in a filter-only run)
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    keys = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "itg_loss")
    lines = ["| pre-training corpus | I→T R@1 | I→T R@5 | T→I R@1 | T→I R@5 | caption loss |",
             "|---|---|---|---|---|---|"]
    for corpus in CORPORA:
        cells = [cell([r["corpora"][corpus][k] for r in results]) for k in keys]
        lines.append(f"| {corpus} | " + " | ".join(cells) + " |")
    lines += ["", "| cleaned corpus | kept captions that are true | synthetic captions that are true | "
                  "kept synthetic that are true | kept captions per image |", "|---|---|---|---|---|"]
    for corpus in CORPORA[1:]:
        cells = [cell([r["captions"][corpus][k] for r in results], 2)
                 for k in ("kept_true", "synthetic_true", "synthetic_kept_true", "kept_per_image")]
        lines.append(f"| {corpus} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Filter against the planted noise: precision {cell([r['filter_precision'] for r in results], 2)}, "
                 f"recall {cell([r['filter_recall'] for r in results], 2)} ({len(results)} seeds).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.3, help="planted noise rate of the raw corpus")
    parser.add_argument("--raw", type=int, default=4000, help="raw corpus size")
    parser.add_argument("--clean", type=int, default=2000, help="clean subset size (captioner and filter)")
    parser.add_argument("--test", type=int, default=500, help="held-out pairs")
    parser.add_argument("--steps", type=int, default=1000, help="pre-training steps, the same for every corpus")
    parser.add_argument("--filter-steps", type=int, default=2000, help="steps of the captioner-filter model")
    parser.add_argument("--sampling", choices=["nucleus", "greedy"], default="nucleus",
                        help="the captioner's decoding (BLIP's CapFilt: nucleus)")
    parser.add_argument("--out", default="out/capfilt-effect")
    parser.add_argument("--json", help="also write the per-seed results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = [one_seed(args, seed) for seed in range(args.seeds)]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\n{args.seeds} seeds, noise {args.noise:.0%}, raw {args.raw}, clean {args.clean}, test {args.test}, "
          f"{args.steps} pre-training steps, {args.filter_steps} captioner-filter steps\n")
    print(table(results))


if __name__ == "__main__":
    main()
