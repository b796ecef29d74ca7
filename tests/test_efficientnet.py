"""EfficientNet-Lite encoder: transformers save/load round trips, lukemelas state-dict import, config checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from capfilt.errors import CapfiltError
from capfilt.models.efficientnet import (
    EfficientNetLiteConfig,
    EfficientNetLiteModel,
    from_lukemelas_state_dict,
    image_processor,
    load_lukemelas_checkpoint,
)

TINY = dict(image_size=32, stem_channels=8, blocks=[[1, 3, 1, 8, 8, 1], [4, 5, 2, 8, 12, 2]], hidden_size=16)

# Our parameter names -> lukemelas EfficientNet-PyTorch names (the inverse of the module's mapping).
TO_LUKEMELAS = [(r"stem\.conv\.", "_conv_stem."), (r"stem\.norm\.", "_bn0."), (r"head\.conv\.", "_conv_head."),
                (r"head\.norm\.", "_bn1."), (r"blocks\.(\d+)\.expand\.conv\.", r"_blocks.\1._expand_conv."),
                (r"blocks\.(\d+)\.expand\.norm\.", r"_blocks.\1._bn0."),
                (r"blocks\.(\d+)\.depthwise\.conv\.", r"_blocks.\1._depthwise_conv."),
                (r"blocks\.(\d+)\.depthwise\.norm\.", r"_blocks.\1._bn1."),
                (r"blocks\.(\d+)\.project\.conv\.", r"_blocks.\1._project_conv."),
                (r"blocks\.(\d+)\.project\.norm\.", r"_blocks.\1._bn2.")]


def random_model(config: EfficientNetLiteConfig) -> EfficientNetLiteModel:
    """A model whose batch-norm statistics are not the init defaults, so a lost buffer changes the outputs."""
    torch.manual_seed(0)
    model = EfficientNetLiteModel(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def to_lukemelas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        pattern, replacement = next((p, r) for p, r in TO_LUKEMELAS if re.match(p, key))
        out[re.sub(pattern, replacement, key, count=1)] = value.clone()
    out["_fc.weight"], out["_fc.bias"] = torch.randn(1000, 1280), torch.zeros(1000)
    return out


def test_tiny_round_trip_through_auto_classes(tmp_path):
    model = random_model(EfficientNetLiteConfig(**TINY))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels)
    # 32 px -> stem stride 2 -> 16 -> one stride-2 stage -> 8 x 8 = 64 tokens.
    assert before.last_hidden_state.shape == (2, 64, 16)
    assert before.pooler_output.shape == (2, 16)
    torch.testing.assert_close(before.pooler_output, before.last_hidden_state.mean(dim=1))

    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, EfficientNetLiteConfig) and config.blocks == TINY["blocks"]
    assert isinstance(AutoModel.from_config(config), EfficientNetLiteModel)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EfficientNetLiteModel)
    with torch.no_grad():
        after = loaded(pixels)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)


def test_image_processor_round_trip(tmp_path):
    config = EfficientNetLiteConfig(**TINY, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = image_processor(config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(images=[image], return_tensors="pt")["pixel_values"], pixels)


def test_default_lite0_from_lukemelas_state_dict_matches():
    model = random_model(EfficientNetLiteConfig())
    lukemelas = to_lukemelas(model.state_dict())
    assert len(lukemelas) == 296  # as many entries as the real efficientnet-lite0 .pth
    imported = from_lukemelas_state_dict(lukemelas)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = model(pixels), imported(pixels)
    assert got.last_hidden_state.shape == (2, 49, 1280)
    assert got.pooler_output.shape == (2, 1280)
    assert torch.equal(expected.last_hidden_state, got.last_hidden_state)


def test_lukemelas_checkpoint_file(tmp_path):
    model = random_model(EfficientNetLiteConfig())
    torch.save(to_lukemelas(model.state_dict()), tmp_path / "lite0.pth")
    imported = load_lukemelas_checkpoint(str(tmp_path / "lite0.pth"))
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, imported(pixels).last_hidden_state)

    with pytest.raises(CapfiltError, match="no such file"):
        load_lukemelas_checkpoint(str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CapfiltError, match="cannot be read"):
        load_lukemelas_checkpoint(str(tmp_path / "junk.pth"))


def test_lukemelas_state_dict_with_wrong_keys_or_shapes_is_refused():
    good = to_lukemelas(EfficientNetLiteModel(EfficientNetLiteConfig()).state_dict())
    missing = dict(good)
    del missing["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(CapfiltError, match="1 missing keys"):
        from_lukemelas_state_dict(missing)
    with pytest.raises(CapfiltError, match="1 unexpected keys"):
        from_lukemelas_state_dict({**good, "_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)})
    with pytest.raises(CapfiltError, match="_conv_head|head.conv"):
        from_lukemelas_state_dict({**good, "_conv_head.weight": torch.zeros(1280, 192, 1, 1)})


@pytest.mark.parametrize("bad", [
    dict(image_size=0), dict(stem_channels=-8), dict(hidden_size=1.5), dict(batch_norm_eps=0),
    dict(image_mean=[0.5, 0.5]), dict(image_std=[0.2, 0.0, 0.2]), dict(blocks=[]),
    dict(blocks=[[1, 3, 1, 32, 16]]), dict(blocks=[[1, 4, 1, 32, 16, 1]]), dict(blocks=[[1, 3, 3, 32, 16, 1]]),
    dict(blocks=[[1, 3, 1, 24, 16, 1]]),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="EfficientNetLiteConfig"):
        EfficientNetLiteConfig(**bad)


def test_lite0_weights_file_is_a_pretrain_tower_and_the_run_a_filter(tmp_path):
    """`--vision efficientnet-lite0.pth` all the way: two stage-1 steps, then the run directory scores captions."""
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from capfilt.cli import app
    from capfilt.data.synth import write_synth
    from capfilt.settings import SynthConfig
    from capfilt.testing import _bert_tokenizer

    torch.save(to_lukemelas(random_model(EfficientNetLiteConfig()).state_dict()), tmp_path / "lite0.pth")
    _bert_tokenizer().save_pretrained(tmp_path / "tok")
    write_synth(tmp_path / "synth", SynthConfig(n=8, per_shard=8, size=48, seed=0))
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", str(tmp_path / "synth"), "--out", str(tmp_path / "run"),
                                 "--vision", str(tmp_path / "lite0.pth"), "--tokenizer", str(tmp_path / "tok"),
                                 "--hidden-size", "32", "--layers", "2", "--heads", "2", "--queries", "4",
                                 "--embed-dim", "16", "--steps", "2", "--batch-size", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    processor = json.loads((tmp_path / "run" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 224, "width": 224}
    result = runner.invoke(app, ["filter", str(tmp_path / "synth"), "--out", str(tmp_path / "filtered"),
                                 "--filter", str(tmp_path / "run"), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "filtered" / "synth-00000.parquet").to_pylist()
    assert len(rows) == 8 and all(0.0 <= r["web_score"] <= 1.0 for r in rows)
