"""Checkpoints users point capfilt at, refused on one line when transformers cannot take them."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from capfilt.cli import app


def test_a_config_transformers_refuses_is_one_line_naming_the_file(tiny_models, tmp_path):
    """A `layer_types` list longer than `num_hidden_layers` fails transformers' config validation (a
    StrictDataclassClassValidationError with a traceback); the user gets the file and the reason."""
    model = tmp_path / "captioner"
    shutil.copytree(tiny_models["blip2_captioner"], model)
    config = json.loads((model / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"]["layer_types"] = ["full_attention"] * (layers + 1)
    (model / "config.json").write_text(json.dumps(config))
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"")
    result = CliRunner().invoke(app, ["caption", str(shards), "--out", str(tmp_path / "out"), "--captioner",
                                      str(model), "--quiet"])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert str(model / "config.json") in message
    assert f"`num_hidden_layers` ({layers}) must be equal to the number of `layer_types` ({layers + 1})" in message
