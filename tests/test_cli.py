"""The CLI itself: a user's mistakes are one-line errors (exit 2), and `capfilt stats` summarises an output."""

from pathlib import Path

import pytest
from helpers import bootstrap_args, cli, mixed_shards, read_json


@pytest.fixture
def shards(tmp_path) -> Path:
    return mixed_shards(tmp_path / "in")


@pytest.mark.parametrize(
    "args, message",
    [
        (["filter", "/nonexistent/x.tar", "--out", "{out}", "--filter", "{itm}"], "no input matched"),
        (["filter", "{shards}", "--out", "{out}", "--filter", "./no/such/model"], "no such model directory"),
        (["filter", "{shards}", "--out", "{out}", "--filter", "{itm}", "--policy", "best"], "unknown policy"),
        (["filter", "{shards}", "--out", "{out}", "--filter", "{itm}", "--threshold", "1.5"], "threshold"),
        (["caption", "{shards}", "--out", "{out}", "--captioner", "{itm}"], "not a BLIP captioning checkpoint"),
        (["filter", "{shards}", "--out", "{notempty}", "--filter", "{itm}"], "not empty"),
        (["stats", "{shards}"], "no capfilt output"),
    ],
)
def test_user_mistakes_are_one_line_errors(shards, tmp_path, tiny_models, args, message):
    notempty = tmp_path / "notempty"
    notempty.mkdir()
    (notempty / "precious.txt").write_text("keep me")
    subs = dict(out=tmp_path / "out", itm=tiny_models["blip_itm"], shards=shards, notempty=notempty)
    result = cli(*[a.format(**subs) for a in args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error:") and message in lines[0]
    assert (notempty / "precious.txt").exists()


def test_stats_command_summarises_output(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    cli(*bootstrap_args(shards, out, tiny_models, "--num-captions", 2))
    result = cli("stats", out)
    assert result.exit_code == 0
    total = sum(read_json(p)["read"] for p in out.glob("*_stats.json"))
    assert f"samples read     {total}" in result.output
    for reason in ("corrupt_image", "caption_not_utf8", "truncated_tar", "no_image"):
        assert reason in result.output
    assert "synthetic score  p5=" in result.output
