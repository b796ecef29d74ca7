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
Overwrite = Annotated[bool, typer.Option(help="Delete capfilt's files in --out first.", rich_help_panel=RUN)]
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

CaptionerModel = Annotated[str, typer.Option("--captioner", help="BlipForConditionalGeneration or "
                                             "Blip2ForConditionalGeneration: Hub id or local directory.",
                                             rich_help_panel=CAPTION)]
Sampling = Annotated[str, typer.Option(help="nucleus (BLIP's CapFilt default), beam or greedy.",
                                       rich_help_panel=CAPTION)]
NumCaptions = Annotated[int, typer.Option(help="Synthetic captions per image (BLIP: 1, BLIP-2: 10).",
                                          rich_help_panel=CAPTION)]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=CAPTION)]
NumBeams = Annotated[int, typer.Option(help="Beams for --sampling beam.", rich_help_panel=CAPTION)]
MaxLength = Annotated[int, typer.Option(help="Max caption tokens, prompt included.", rich_help_panel=CAPTION)]
MinLength = Annotated[int, typer.Option(help="Min caption tokens, prompt included.", rich_help_panel=CAPTION)]
Prompt = Annotated[str, typer.Option(help="Decoder prompt, removed from the captions.", rich_help_panel=CAPTION)]

FilterModel = Annotated[str, typer.Option("--filter", help="BlipForImageTextRetrieval or "
                                          "Blip2ForImageTextRetrieval: Hub id or local directory.",
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


def _captioner(model, sampling, num_captions, top_p, num_beams, max_length, min_length, prompt, device, dtype):
    from capfilt.captioner import Captioner, CaptionerConfig

    return Captioner(CaptionerConfig(model=model, sampling=sampling, num_captions=num_captions, top_p=top_p,
                                     num_beams=num_beams, max_length=max_length, min_length=min_length,
                                     prompt=prompt, device=device, dtype=dtype))


def _scorer(model, device, dtype):
    from capfilt.scorer import Scorer, ScorerConfig

    return Scorer(ScorerConfig(model=model, device=device, dtype=dtype))


def _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, captioner=None,
         scorer=None, selection=None):
    from capfilt.pipeline import RunConfig, run
    from capfilt.stats import format_report, summarize

    config = RunConfig(specs=tuple(specs), out=str(out), batch_size=batch_size, workers=workers, seed=seed,
                       clean_text=clean_text, overwrite=overwrite, retries=retries, progress=not quiet)
    summary = run(config, captioner=captioner, scorer=scorer, selection=selection)
    rate = summary.samples / summary.duration_s if summary.duration_s else 0.0
    typer.echo(f"this run: {summary.shards_done} shards done, {summary.shards_skipped} already done, "
               f"{summary.samples:,} samples in {summary.duration_s:.1f}s ({rate:.1f}/s)")
    typer.echo(format_report(summarize(out)))
    if summary.shards_failed:
        for shard, reason in summary.shards_failed.items():
            typer.echo(f"failed shard {shard}: {reason}", err=True)
        raise CapfiltError(f"{len(summary.shards_failed)} shard(s) failed; rerun the same command to retry them")


@app.command()
def caption(
    specs: Specs, out: Out, captioner: CaptionerModel,
    sampling: Sampling = "nucleus", num_captions: NumCaptions = 1, top_p: TopP = 0.9, num_beams: NumBeams = 3,
    max_length: MaxLength = 30, min_length: MinLength = 10, prompt: Prompt = "a picture of ",
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", seed: Seed = 0, clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
):
    """Add synthetic captions to every sample (no filtering); `capfilt filter` can score them later."""
    with _user_errors():
        model = _captioner(captioner, sampling, num_captions, top_p, num_beams, max_length, min_length, prompt,
                           device, dtype)
        _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, captioner=model)


@app.command("filter")
def filter_(
    specs: Specs, out: Out, filter: FilterModel,
    policy: Policy = "blip", threshold: Threshold = 0.5, keep_top: KeepTop = 2,
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
):
    """Score the web caption and any synthetic captions with an ITM head and keep the matching ones."""
    from capfilt.selection import SelectionConfig

    with _user_errors():
        selection = SelectionConfig(policy=policy, threshold=threshold, keep_top=keep_top)
        model = _scorer(filter, device, dtype)
        _run(specs, out, overwrite, batch_size, workers, None, clean_text, retries, quiet, scorer=model,
             selection=selection)


@app.command()
def bootstrap(
    specs: Specs, out: Out, captioner: CaptionerModel, filter: FilterModel,
    sampling: Sampling = "nucleus", num_captions: NumCaptions = 1, top_p: TopP = 0.9, num_beams: NumBeams = 3,
    max_length: MaxLength = 30, min_length: MinLength = 10, prompt: Prompt = "a picture of ",
    policy: Policy = "blip", threshold: Threshold = 0.5, keep_top: KeepTop = 2,
    overwrite: Overwrite = False, batch_size: BatchSize = 16, workers: Workers = 2, device: Device = "auto",
    dtype: Dtype = "fp32", seed: Seed = 0, clean_text: CleanText = False, retries: Retries = 2, quiet: Quiet = False,
):
    """Caption and filter in one streaming pass (the main job): no intermediate shards."""
    from capfilt.selection import SelectionConfig

    with _user_errors():
        selection = SelectionConfig(policy=policy, threshold=threshold, keep_top=keep_top)
        cap = _captioner(captioner, sampling, num_captions, top_p, num_beams, max_length, min_length, prompt,
                         device, dtype)
        scorer = _scorer(filter, device, dtype)
        _run(specs, out, overwrite, batch_size, workers, seed, clean_text, retries, quiet, captioner=cap,
             scorer=scorer, selection=selection)


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
