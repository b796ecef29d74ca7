"""The CapFilt run (`run`, behind caption / filter / bootstrap): every sample accounted for, captions scored and
selected, resume to the same bytes, retries, OOM halving, one tower pass, image-only samples, claims; on shards
with real JPEGs and every kind of bad input."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (
    bootstrap_args,
    cli,
    counts,
    demo_samples,
    interrupted_at_batch,
    mixed_shards,
    outputs,
    read_json,
    tar_members,
    write_tar,
)

from capfilt.bootstrap import pipeline
from capfilt.bootstrap.pipeline import run
from capfilt.models.captioner import Captioner
from capfilt.models.scorer import Scorer
from capfilt.settings import CaptionerConfig, RunConfig, ScorerConfig, SelectionConfig
from capfilt.testing import blip2_filter_on_captioner_tower


@pytest.fixture
def shards(tmp_path) -> Path:
    return mixed_shards(tmp_path / "in")


def test_bootstrap_writes_clean_shards_and_accounts_for_every_sample(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    result = cli(*bootstrap_args(shards, out, tiny_models, "--num-captions", 2, "--threshold", 0.55))
    assert result.exit_code == 0, result.output
    assert "samples read" in result.output

    inputs = {s["__key__"]: s for s in demo_samples(25)}
    total_rows = 0
    for name in ("part-00000", "part-00001", "part-00002", "part-00003"):
        stats = read_json(out / f"{name}_stats.json")
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        total_rows += len(rows)
        kept_keys = {r["key"] for r in rows if r["status"] == "ok"}
        assert (out / f"{name}.tar").exists() == bool(kept_keys)  # a shard that keeps nothing has no tar
        members = tar_members(out / f"{name}.tar") if kept_keys else []
        assert {m.split(".")[0] for m, _ in members} == kept_keys
        assert stats["written"] == len(kept_keys)
        assert stats["dropped"] == sum(r["status"] == "dropped" for r in rows)
        assert sum(stats["errors"].values()) == sum(r["status"] == "error" for r in rows)
        for member, data in members:
            key, ext = member.split(".", 1)
            if ext == "jpg" and key in inputs:
                assert data == inputs[key]["jpg"]  # image bytes never re-encoded
            if ext == "json":
                capfilt = json.loads(data)["capfilt"]
                assert [c["source"] for c in capfilt["candidates"]][0] == "web"
                assert all(c["score"] is not None for c in capfilt["candidates"])
                assert capfilt["policy"] == "blip" and capfilt["threshold"] == 0.55
                assert capfilt["filter"] == tiny_models["blip_itm"]
            if ext == "txt":
                row = next(r for r in rows if r["key"] == key)
                assert data.decode() == row["kept_captions"][0]
        for row in rows:
            if row["status"] != "error":
                assert len(row["synthetic_captions"]) <= 2
                assert all(s >= 0.55 for s in scores_of_kept(row))
                assert row["status"] == ("ok" if row["kept_captions"] else "dropped")

    bad = {r["key"]: r for r in pq.read_table(out / "part-00001.parquet").to_pylist()}
    assert {k: r["reason"] for k, r in bad.items() if r["status"] == "error"} == {
        "corrupt": "corrupt_image", "truncjpg": "corrupt_image", "latin1": "caption_not_utf8", "noimage": "no_image"}
    image_only = bad["nocaption"]  # no web caption: scored on its synthetic captions alone
    assert image_only["web_caption"] is None and image_only["web_score"] is None
    assert len(image_only["synthetic_scores"]) == len(image_only["synthetic_captions"]) >= 1
    assert image_only["detail"] == "no txt member and no caption in json"
    trunc = pq.read_table(out / "part-00002.parquet").to_pylist()
    assert trunc[-1]["key"] == "" and trunc[-1]["reason"] == "truncated_tar"
    assert any(r["status"] != "error" for r in trunc)
    assert not list(out.glob("*.tmp"))


def scores_of_kept(row):
    scores = dict(zip(row["synthetic_captions"], row["synthetic_scores"]))
    scores[row["web_caption"]] = row["web_score"]
    return [scores[c] for c in row["kept_captions"]]


def test_caption_then_filter_equals_scoring_the_same_captions(shards, tmp_path, tiny_models):
    captioned, filtered = tmp_path / "cap", tmp_path / "fil"
    r = cli("caption", shards / "part-00000.tar", "--out", captioned, "--captioner",
            tiny_models["blip2_captioner"], "--num-captions", 3, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    cap_json = [json.loads(d) for m, d in tar_members(captioned / "part-00000.tar") if m.endswith(".json")]
    assert len(cap_json) == 10
    assert all(c["capfilt"]["filter"] is None and c["capfilt"]["candidates"][0]["score"] is None for c in cap_json)

    r = cli("filter", captioned, "--out", filtered, "--filter", tiny_models["blip2_itm"], "--policy", "blip2",
            "--keep-top", 2, "--threshold", 0, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(filtered / "part-00000.parquet").to_pylist()
    for row, before in zip(rows, cap_json):
        synthetic = [c["caption"] for c in before["capfilt"]["candidates"] if c["source"] == "synthetic"]
        assert row["synthetic_captions"] == synthetic  # the captions written by `caption` are the ones scored
        assert row["web_caption"] == before["caption"]
        assert len(row["kept_captions"]) == 2
        best = max(scores_of_kept(row))
        assert scores_of_kept(row)[0] == best
    out_json = [json.loads(d) for m, d in tar_members(filtered / "part-00000.tar") if m.endswith(".json")]
    assert all(j["capfilt"]["captioner"] == tiny_models["blip2_captioner"] for j in out_json)


def test_clean_text_cleans_every_caption(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    r = cli("filter", shards / "part-00000.tar", "--out", out, "--filter", tiny_models["blip_itm"], "--threshold",
            0, "--clean-text", "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    for row in pq.read_table(out / "part-00000.parquet").to_pylist():
        assert row["web_caption"] == row["web_caption"].lower() and "." not in row["web_caption"]


# ------------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def stages(tiny_models):
    return (Captioner(CaptionerConfig(model=tiny_models["blip_captioner"], num_captions=2)),
            Scorer(ScorerConfig(model=tiny_models["blip_itm"])))


def _run(shards, out, stages, workers=0):
    config = RunConfig(specs=(str(shards),), out=str(out), batch_size=3, workers=workers, progress=False)
    return run(config, captioner=stages[0], scorer=stages[1], selection=SelectionConfig(threshold=0.55))


def _run_killed_at_batch(n: int, shards, out, stages) -> None:
    """A run interrupted as its n-th batch starts (Ctrl-C: the finally blocks run)."""
    with interrupted_at_batch(n), pytest.raises(KeyboardInterrupt):
        _run(shards, out, stages)


def test_interrupted_run_resumes_to_the_uninterrupted_output(shards, tmp_path, stages, monkeypatch):
    reference = tmp_path / "reference"
    _run(shards, reference, stages)

    out = tmp_path / "resumed"
    _run_killed_at_batch(5, shards, out, stages)
    done_before = {p.name for p in out.glob("*_stats.json")}
    assert 0 < len(done_before) < 4 and not list(out.glob("*.tmp"))

    # A hard kill can also leave a stale temp file, and a renamed tar whose stats never got written.
    victim = sorted(shards.glob("*.tar"))[-1].stem
    (out / f"{victim}.tar.tmp").write_bytes(b"half a tar")
    (out / f"{victim}.tar").write_bytes(b"an old tar")

    summary = _run(shards, out, stages)
    assert summary.shards_skipped == len(done_before)
    assert outputs(out) == outputs(reference)
    assert counts(out) == counts(reference)
    assert not list(out.glob("*.tmp"))


def test_worker_processes_do_not_change_output(shards, tmp_path, stages):
    _run(shards, tmp_path / "w0", stages, workers=0)
    _run(shards, tmp_path / "w2", stages, workers=2)
    assert outputs(tmp_path / "w0") == outputs(tmp_path / "w2")


def test_finished_run_is_not_redone(shards, tmp_path, stages):
    out = tmp_path / "out"
    _run(shards, out, stages)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = _run(shards, out, stages)
    assert summary.shards_done == 0 and summary.shards_skipped == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_broken_stream_is_retried_and_a_dead_one_reported(shards, tmp_path, tiny_models):
    tar = shards / "part-00000.tar"
    # Fails once half-way through (a dropped connection), then streams the whole shard.
    flaky = (f"""pipe:bash -c 'if [ -e "$0.flag" ]; then cat "$0"; else touch "$0.flag"; head -c 300000 "$0"; """
             f"""exit 1; fi' {tar}""")
    out, reference = tmp_path / "out", tmp_path / "ref"
    args = ["filter", "--filter", tiny_models["blip_itm"], "--workers", 0, "--quiet", "--retries", 1]
    assert cli(*args[:1], tar, "--out", reference, *args[1:]).exit_code == 0
    result = cli(*args[:1], flaky, "--out", out, *args[1:])
    assert result.exit_code == 0, result.output
    assert outputs(out) == outputs(reference)

    dead = f"pipe:bash -c 'head -c 300000 $0; exit 3' {shards / 'part-00003.tar'}"
    result = cli(*args[:1], tar, dead, "--out", tmp_path / "dead", *args[1:])
    assert result.exit_code == 2 and "1 shard(s) failed" in result.output
    assert "failed shard part-00003: OSError" in result.output
    assert sorted(p.name for p in (tmp_path / "dead").glob("*_stats.json")) == ["part-00000_stats.json"]
    assert not list((tmp_path / "dead").glob("part-00003*"))


def _same_selection(out: Path, reference: Path, tolerance: float = 1e-5) -> None:
    """What a user sees is the same: keys, statuses, reasons, captions, image bytes; scores equal within
    `tolerance`. Not bytes: batched CPU kernels round differently for different batch sizes (8th digit seen),
    so byte equality holds only while the batch composition is too."""
    import pyarrow.parquet as pq

    names = sorted(p.name for p in reference.glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == names
    for name in names:
        rows, expected = (pq.read_table(d / name).to_pylist() for d in (out, reference))
        assert [r["key"] for r in rows] == [r["key"] for r in expected]
        for row, want in zip(rows, expected):
            for column in ("status", "reason", "web_caption", "synthetic_captions", "kept_captions"):
                assert row[column] == want[column], (name, row["key"], column)
            assert row["web_score"] == pytest.approx(want["web_score"], abs=tolerance)
            assert row["synthetic_scores"] == pytest.approx(want["synthetic_scores"], abs=tolerance)
        tar = name.replace(".parquet", ".tar")
        assert (out / tar).exists() == (reference / tar).exists()  # no tar where a shard keeps nothing
        members, want = (tar_members(d / tar) if (d / tar).exists() else [] for d in (out, reference))
        assert [m for m, _ in members] == [m for m, _ in want]
        for (member, data), (_, wanted) in zip(members, want):
            if member.endswith(".json"):  # the candidates' scores are in it
                data, wanted = (json.loads(d)["capfilt"]["candidates"] for d in (data, wanted))
                assert [c["score"] for c in data] == pytest.approx([c["score"] for c in wanted], abs=tolerance)
                data, wanted = ([{**c, "score": None} for c in d] for d in (data, wanted))
            assert data == wanted, (tar, member)  # images byte for byte, the best caption


def test_a_batch_out_of_gpu_memory_is_retried_in_halves(shards, tmp_path, stages, monkeypatch):
    """A run whose scorer runs out of memory above 2 images keeps and drops what one that never did does, and its
    stats say the batches were halved."""
    import torch

    def filter_only(out):
        config = RunConfig(specs=(str(shards),), out=str(out), batch_size=4, workers=0, progress=False)
        return run(config, scorer=stages[1], selection=SelectionConfig(threshold=0.55))

    filter_only(tmp_path / "plenty")
    real_call = Scorer.__call__

    def small_gpu(self, pixel_values, texts):
        if len(pixel_values) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, pixel_values, texts)

    monkeypatch.setattr(Scorer, "__call__", small_gpu)
    filter_only(tmp_path / "small")
    _same_selection(tmp_path / "small", tmp_path / "plenty")
    halvings = sum(read_json(p)["oom_halvings"] for p in (tmp_path / "small").glob("*_stats.json"))
    assert halvings == 1  # the limit, once halved, holds for the rest of the run
    assert "OOM halvings" in cli("stats", tmp_path / "small").output


def test_captioner_and_filter_on_one_frozen_tower_run_it_once_per_batch(shards, tmp_path, tiny_models,
                                                                        monkeypatch):
    """BLIP-2's stage-1 filter and stage-2 captioner (and capfilt's own pair) carry the same frozen tower: it
    runs once per batch for both, and the output is byte for byte what two separate towers give."""
    same_tower = blip2_filter_on_captioner_tower(tiny_models, tmp_path / "itm-same-tower")

    def bootstrap(out, filter_model):
        captioner = Captioner(CaptionerConfig(model=tiny_models["blip2_captioner"], num_captions=2))
        scorer = Scorer(ScorerConfig(model=filter_model))
        passes = []
        for model in (captioner.model, scorer.model):  # counts the tower's real work, not calls answered again
            model.vision_model.embeddings.register_forward_hook(lambda *_: passes.append(1))
        own_tower = scorer.model.vision_model
        summary = run(RunConfig(specs=(str(shards),), out=str(out), batch_size=3, workers=0, progress=False),
                      captioner=captioner, scorer=scorer)
        assert scorer.model.vision_model is own_tower  # nothing outlives the run: not the wrapper either
        assert "forward" not in vars(captioner.model.vision_model)
        return summary, len(passes)

    shared, shared_passes = bootstrap(tmp_path / "shared", same_tower)
    other, other_passes = bootstrap(tmp_path / "other", tiny_models["blip2_itm"])
    assert other_passes == 2 * shared_passes > 0  # different towers: both run
    monkeypatch.setattr(pipeline, "same_vision_tower", lambda *models: False)
    separate, separate_passes = bootstrap(tmp_path / "separate", same_tower)
    assert separate_passes == 2 * shared_passes
    assert separate.written == shared.written > 0
    assert outputs(tmp_path / "separate") == outputs(tmp_path / "shared")
    assert counts(tmp_path / "separate") == counts(tmp_path / "shared")


# ------------------------------------------------------------------------------------------------ image-only


@pytest.fixture
def image_only(tmp_path) -> Path:
    """img2dataset run without a caption column: jpg + json (caption null), and neighbours with empty captions."""
    d = tmp_path / "images"
    d.mkdir()
    photos = demo_samples(5)
    samples = [{"__key__": f"{i:09d}", "jpg": s["jpg"], "json": json.dumps({"url": f"http://x/{i}.jpg",
               "caption": None, "status": "success"}).encode()} for i, s in enumerate(photos[:3])]
    samples += [{"__key__": "emptytxt", "jpg": photos[3]["jpg"], "txt": b" "},
                {**photos[4], "__key__": "captioned"}]
    write_tar(d / "00000.tar", samples)
    return d


def test_caption_captions_image_only_samples_and_filter_scores_those_captions(image_only, tmp_path, tiny_models):
    captioned, filtered, raw = tmp_path / "cap", tmp_path / "fil", tmp_path / "raw"
    r = cli("caption", image_only, "--out", captioned, "--captioner", tiny_models["blip_captioner"],
            "--num-captions", 2, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    rows = {r["key"]: r for r in pq.read_table(captioned / "00000.parquet").to_pylist()}
    assert all(r["status"] == "ok" for r in rows.values()) and len(rows) == 5
    for key in ("000000000", "000000001", "000000002", "emptytxt"):
        assert rows[key]["web_caption"] is None and rows[key]["synthetic_captions"]
    assert rows["000000000"]["detail"] == "no txt member and no caption in json"
    assert rows["emptytxt"]["detail"] == "the txt member is empty"
    members = dict(tar_members(captioned / "00000.tar"))
    meta = json.loads(members["000000000.json"])
    assert meta["url"] == "http://x/0.jpg" and {c["source"] for c in meta["capfilt"]["candidates"]} == {"synthetic"}
    assert members["000000000.txt"].decode() == rows["000000000"]["synthetic_captions"][0]

    # filter on caption's output scores the synthetic captions; on the raw images it has nothing to score.
    r = cli("filter", captioned, "--out", filtered, "--filter", tiny_models["blip_itm"], "--threshold", 0,
            "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    rows = {r["key"]: r for r in pq.read_table(filtered / "00000.parquet").to_pylist()}
    assert rows["000000000"]["status"] == "ok" and rows["000000000"]["web_caption"] is None
    assert len(rows["000000000"]["synthetic_scores"]) == 2 and rows["000000000"]["kept_captions"]
    r = cli("filter", image_only, "--out", raw, "--filter", tiny_models["blip_itm"], "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    rows = {r["key"]: r for r in pq.read_table(raw / "00000.parquet").to_pylist()}
    assert {k: r["reason"] for k, r in rows.items() if r["status"] == "error"} == dict.fromkeys(
        ["000000000", "000000001", "000000002", "emptytxt"], "missing_caption")
    assert rows["000000000"]["detail"] == "no txt member and no caption in json: nothing to score"
    assert rows["emptytxt"]["detail"] == "the txt member is empty: nothing to score"


def test_duplicate_keys_write_the_first_sample_once(tmp_path, tiny_models):
    a, b = demo_samples(2)
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "dup.tar", [a, b, {**a, "txt": b"a second sample under the first key"}])
    out = tmp_path / "out"
    r = cli("filter", d, "--out", out, "--filter", tiny_models["blip_itm"], "--threshold", 0, "--workers", 0,
            "--quiet")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out / "dup.parquet").to_pylist()
    assert [(r["key"], r["status"], r["reason"]) for r in rows] == [
        (a["__key__"], "ok", None), (b["__key__"], "ok", None), (a["__key__"], "error", "duplicate_key")]
    members = [m for m, _ in tar_members(out / "dup.tar")]
    assert members.count(f"{a['__key__']}.jpg") == 1
    assert dict(tar_members(out / "dup.tar"))[f"{a['__key__']}.txt"] == a["txt"].strip()
    assert read_json(out / "dup_stats.json")["errors"] == {"duplicate_key": 1}


# ------------------------------------------------------------------------------------------------ claims


def test_a_finished_job_leaves_no_claims_of_dead_attempts(shards, tmp_path, stages, monkeypatch):
    out = tmp_path / "out"
    _run_killed_at_batch(3, shards, out, stages)
    # What a SIGKILLed attempt leaves (no finally runs): its claim on the shard it was writing.
    dead = out / ".claims" / "torchrun-first-0"
    dead.mkdir(parents=True)
    (dead / "part-00003").write_text(json.dumps({"host": "node1", "pid": 12345, "time": 0}))
    (out / "part-00003.tar.tmp").write_bytes(b"half a tar")

    _run(shards, out, stages)
    names = sorted(p.name for p in out.iterdir())
    assert ".claims" not in names and not [n for n in names if n.endswith(".tmp")]
    assert all(n == "capfilt_run.json" or n.endswith((".tar", ".parquet", "_stats.json")) for n in names), names
