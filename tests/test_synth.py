"""The synthetic world: deterministic, captions true to the pictures, planted noise exactly as marked."""

import pytest
from typer.testing import CliRunner

from capfilt import CapfiltError
from capfilt.cli import app
from capfilt.data.reader import decode_image, read_shard
from capfilt.data.synth import COLOURS, write_synth
from capfilt.settings import SynthConfig


def test_synth_cli_is_deterministic_and_readable(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(app, ["synth", "--out", str(tmp_path / name), "--n", "30", "--per-shard", "12",
                                     "--noise", "0.3"])
        assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "a").glob("*.tar"))
    assert [p.name for p in shards] == ["synth-00000.tar", "synth-00001.tar", "synth-00002.tar"]
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in shards)
    samples = [s for p in shards for s in read_shard(str(p))]
    assert len(samples) == 30 and all(s.error is None and s.image_ext == "png" for s in samples)
    assert len({s.key for s in samples}) == 30


def test_captions_describe_the_pictures_and_noise_is_marked(tmp_path):
    config = SynthConfig(n=40, per_shard=40, noise=0.25, size=48, seed=3)
    samples = list(read_shard(str(write_synth(tmp_path, config)[0])))
    noisy = [s for s in samples if s.meta["synth"]["noisy"]]
    assert len(noisy) == 10
    for s in samples:
        truth = s.meta["synth"]
        assert (s.web_caption != truth["true_caption"]) == truth["noisy"]
        image = decode_image(s.image)
        for shape in truth["shapes"]:
            col, row = shape["cell"]
            centre = (int((col + 0.5) * 16), int((row + 0.55) * 16))  # inside every shape kind
            assert image.getpixel(centre) == COLOURS[shape["colour"]]
            assert f"{shape['colour']} {shape['kind']}" in truth["true_caption"]
        assert " a orange" not in truth["true_caption"] and not truth["true_caption"].startswith("a orange")


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=5, noise=1.0), dict(n=5, size=8), dict(n=5, per_shard=20000)])
def test_synth_config_validates(kwargs):
    with pytest.raises(CapfiltError):
        SynthConfig(**kwargs)
