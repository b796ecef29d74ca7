"""The demo recipe end to end with tiny random frozen parts (no download): every stage runs, and the summary
agrees with the shards and the output."""

from __future__ import annotations

import pyarrow.parquet as pq

from capfilt.data.reader import read_shard
from capfilt.settings import QFormerShape
from capfilt.testing import build_tiny_qformer_parts
from pipelines.demo import REPO, DemoConfig, run_demo


def test_demo_recipe_runs_every_stage_and_reports_against_the_planted_noise(tmp_path):
    parts = build_tiny_qformer_parts(tmp_path / "parts")
    messages = []
    config = DemoConfig(out=str(tmp_path / "loop"), vision=parts["vision"], llm=parts["llm"], stage1_steps=3,
                        stage2_steps=2, batch_size=8, num_captions=2, workers=0, device="cpu",
                        shape=QFormerShape(hidden_size=32, num_layers=2, num_heads=2, num_query_tokens=4,
                                           embed_dim=128))
    summary = run_demo(config, say=messages.append)
    loop = tmp_path / "loop"
    assert [m.split("]")[0] for m in messages] == ["[1/5", "[2/5", "[3/5", "[3/5", "[4/5", "[5/5"]
    for done in ("tokenizer/tokenizer_config.json", "stage1/config.json", "stage2/config.json",
                 "stage2/llm_tokenizer/tokenizer_config.json"):
        assert (loop / done).is_file(), done
    assert len(list((loop / "cleaned").glob("*_stats.json"))) == 4

    truth = {s.key: s.meta["capfilt_demo"]["noisy"] for p in sorted((REPO / "shards").glob("demo-*.tar"))
             for s in read_shard(str(p))}
    rows = [r for p in sorted((loop / "cleaned").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    removed = {r["key"] for r in rows if r["web_caption"] not in (r["kept_captions"] or [])}
    noise = summary.noise
    assert (noise.noisy, noise.clean) == (sum(truth.values()), len(truth) - sum(truth.values())) == (20, 60)
    assert noise.noisy_removed == sum(truth[k] for k in removed)
    assert noise.clean_kept == sum(not truth[k] for k in truth if k not in removed)
    assert all(len(ex["synthetic"]) == 2 for ex in noise.examples)
    assert "planted noisy captions removed" in summary.format()
    page = (loop / "cleaned" / "report.html").read_text()
    assert summary.report == str(loop / "cleaned" / "report.html") and f"report: {summary.report}" in summary.format()
    assert "20 planted noisy and 60 clean web" in page  # the report found the demo's ground truth

    again = run_demo(config, say=messages.append)  # a rerun finds every stage done
    assert again.seconds["stage 1"] < summary.seconds["stage 1"] or summary.seconds["stage 1"] < 1
