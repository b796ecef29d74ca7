"""`capfilt select`: the recorded scores re-selected without models equal a full run at the new settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, cli, counts, demo_samples, mixed_shards, outputs, read_json, tar_members, write_tar

from capfilt.data.schema import MANIFEST, ROW_SCHEMA


@pytest.fixture
def shards(tmp_path) -> Path:
    return mixed_shards(tmp_path / "in", last=False)


def bootstrap(shards, out, models, *extra):
    result = cli("bootstrap", shards, "--out", out, "--captioner", models["blip_captioner"], "--filter",
                 models["blip_itm"], "--num-captions", 2, "--batch-size", 4, "--workers", 0, "--quiet", *extra)
    assert result.exit_code == 0, result.output


def statuses(out: Path) -> dict[str, str]:
    return {r["key"]: r["status"] for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def test_select_at_a_threshold_equals_bootstrap_at_it_byte_for_byte(shards, tmp_path, tiny_models):
    recorded = tmp_path / "recorded"
    bootstrap(shards, recorded, tiny_models)  # threshold 0.5
    scores = sorted(r["web_score"] for p in recorded.glob("*.parquet") for r in pq.read_table(p).to_pylist()
                    if r["web_score"] is not None)
    t = round(scores[len(scores) // 2], 6)  # some web captions on each side of it
    for policy in (["--threshold", t], ["--threshold", t, "--policy", "blip2", "--keep-top", 1]):
        full, selected = tmp_path / f"full{len(policy)}", tmp_path / f"selected{len(policy)}"
        bootstrap(shards, full, tiny_models, *policy)
        result = cli("select", shards, "--from", recorded, "--out", selected, "--quiet", *policy)
        assert result.exit_code == 0, result.output
        assert outputs(selected) == outputs(full)
        assert counts(selected) == counts(full)
        assert statuses(selected) != statuses(recorded) or policy[2:]  # the threshold changed what is kept
        manifest, reference = read_json(selected / MANIFEST)["settings"], read_json(full / MANIFEST)["settings"]
        assert manifest.pop("selected_from") == str(recorded.resolve())
        assert manifest == reference
    assert "samples read" in result.output


def test_select_resumes_and_never_alters_the_recorded_run(shards, tmp_path, tiny_models):
    recorded = tmp_path / "recorded"
    bootstrap(shards, recorded, tiny_models)
    before = {p.name: p.read_bytes() for p in recorded.iterdir()}
    out = tmp_path / "sel"
    assert cli("select", shards, "--from", recorded, "--out", out, "--threshold", 0.3, "-q").exit_code == 0
    first = outputs(out)
    again = cli("select", shards, "--from", recorded, "--out", out, "--threshold", 0.3, "-q")
    assert again.exit_code == 0 and "0 shards done, 3 already done" in again.output
    assert outputs(out) == first
    # A killed attempt leaves its shard unfinished with a temporary file under a name unique to it: the resume
    # redoes the shard to the same bytes and leaves no temporary file behind.
    shard = sorted(p for p in out.glob("*_stats.json"))[0].name.removesuffix("_stats.json")
    (out / f"{shard}_stats.json").unlink()
    (out / f"{shard}.tar.4242-0123abcd.tmp").write_bytes(b"half a tar")
    resumed = cli("select", shards, "--from", recorded, "--out", out, "--threshold", 0.3, "-q")
    assert resumed.exit_code == 0 and "1 shards done, 2 already done" in resumed.output
    assert outputs(out) == first and not list(out.glob("*.tmp"))
    other = cli("select", shards, "--from", recorded, "--out", out, "--threshold", 0.4, "-q")
    assert other.exit_code == 2 and "other settings (selection)" in other.output
    same = cli("select", shards, "--from", recorded, "--out", recorded, "-q")
    assert same.exit_code == 2 and "never altered" in same.output
    assert {p.name: p.read_bytes() for p in recorded.iterdir()} == before


def test_samples_without_recorded_scores_are_error_rows_never_kept(shards, tmp_path, tiny_models):
    recorded = tmp_path / "recorded"
    bootstrap(shards / "part-00000.tar", recorded, tiny_models, "--threshold", 0)
    # One row loses its scores, another its row; a third shard was never in the recorded run.
    path = recorded / "part-00000.parquet"
    rows = pq.read_table(path).to_pylist()
    lost_scores, lost_row = rows[1]["key"], rows[2]["key"]
    rows[1]["web_score"] = None
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["key"] != lost_row], schema=ROW_SCHEMA), path)
    write_tar(shards / "extra-00000.tar", demo_samples(3, start=30))

    out = tmp_path / "sel"
    result = cli("select", shards / "part-00000.tar", shards / "extra-00000.tar", "--from", recorded, "--out", out,
                 "--threshold", 0, "-q")
    assert result.exit_code == 0, result.output
    got = {r["key"]: r for r in pq.read_table(out / "part-00000.parquet").to_pylist()}
    for key in (lost_scores, lost_row):
        assert got[key]["status"] == "error" and got[key]["reason"] == "no_recorded_scores", got[key]
    assert "lacks scores" in got[lost_scores]["detail"] and "no row" in got[lost_row]["detail"]
    assert sum(r["status"] == "ok" for r in got.values()) == 8  # threshold 0 keeps everything else
    extra = pq.read_table(out / "extra-00000.parquet").to_pylist()
    assert [r["reason"] for r in extra] == ["no_recorded_scores"] * 3
    assert "not finished" in extra[0]["detail"]
    assert read_json(out / "extra-00000_stats.json")["errors"] == {"no_recorded_scores": 3}
    members = {m.split(".")[0] for m, _ in tar_members(out / "part-00000.tar")}
    assert lost_scores not in members and lost_row not in members


def test_select_refuses_a_run_without_scores(shards, tmp_path, tiny_models):
    captioned = tmp_path / "cap"
    r = cli("caption", shards / "part-00000.tar", "--out", captioned, "--captioner", tiny_models["blip_captioner"],
            "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    result = cli("select", shards / "part-00000.tar", "--from", captioned, "--out", tmp_path / "sel")
    assert result.exit_code == 2 and "recorded no scores" in result.output
    nothing = cli("select", shards, "--from", tmp_path / "nowhere", "--out", tmp_path / "sel2")
    assert nothing.exit_code == 2 and "no capfilt output" in nothing.output


def test_select_help_explains_it():
    result = cli("select", "--help")
    assert result.exit_code == 0
    for words in ("--from", "no model", "no_recorded_scores", "--threshold"):
        assert words in result.output


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (this checkout first on its path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                          env=env, capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_select_loads_no_model_code():
    """`capfilt select` starts without the models and transformers: its module, and the CLI asked for its help."""
    model_code = ("transformers", "capfilt.models", "capfilt.bootstrap.pipeline")
    imported = _modules_after("import capfilt.bootstrap.reselect")
    assert "capfilt.bootstrap.outcome" in imported
    assert not [m for m in imported if m.startswith(model_code)]
    helped = _modules_after("from typer.testing import CliRunner\nfrom capfilt.cli import app\n"
                            "assert CliRunner().invoke(app, ['select', '--help']).exit_code == 0")
    assert "capfilt.cli" in helped
    assert not [m for m in helped if m.startswith(model_code)]
