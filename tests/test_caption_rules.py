"""Caption rules: degenerate captions are dropped before scoring (never scored, never kept, their rule recorded);
ordinary captions, the demo's 400 human ones among them, are not; the rules can be switched off."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import DEMO_SHARDS, cli, demo_samples, read_json, write_tar

from capfilt.data.caption_rules import caption_rule
from capfilt.data.schema import (
    ALL_BELOW_THRESHOLD,
    ALL_FAILED_RULES,
    CAPTION_RULES,
    MANIFEST,
    MARKUP_OR_CODE,
    REPEATED_NGRAMS,
    TOO_FEW_WORDS,
    TOO_LITTLE_TEXT,
    UNFINISHED_SENTENCE,
)
from capfilt.settings import CaptionRulesConfig

RULES = CaptionRulesConfig()


# Issue 23: captions the demo's filter kept, and the rule that must drop each.
ISSUE_CAPTIONS = {
    "a 2019-3-7.png": TOO_FEW_WORDS,
    "the universe 0x5329b7fe-e4ff": MARKUP_OR_CODE,
    "Aaliyah's mom at the 2017 Fiesta Party</div>": MARKUP_OR_CODE,
    "the city": TOO_FEW_WORDS,
    "the": TOO_FEW_WORDS,
    "a person's legs is made up of. It looks like they are wearing something under their clothing so to speak. "
    "I am the person": UNFINISHED_SENTENCE,
}
MORE_CAPTIONS = {
    "2019 05 13 18 44 07 raw": TOO_LITTLE_TEXT,
    "a dog &amp; a cat on the sofa": MARKUP_OR_CODE,
    "photo of a cat https://example.com/cat": MARKUP_OR_CODE,
    "DSC01234.JPG at the beach": MARKUP_OR_CODE,
    "a cat sitting next to 5329b7fe4ff on a bed": MARKUP_OR_CODE,
    "{{ product.title }} in red": MARKUP_OR_CODE,
    "a kitchen with a kitchen with a kitchen with a kitchen": REPEATED_NGRAMS,
    "the the the the the": REPEATED_NGRAMS,
    "a man sitting on a bench with a": UNFINISHED_SENTENCE,
    "two dogs playing in the snow and": UNFINISHED_SENTENCE,
}
# Web alt-text as people write it: none of these may be dropped.
ALT_TEXT = [
    "Sunset over the lake. Photo by J. Smith",
    "Nike Air Max 90 - White/Black",
    "Dr. Smith speaks at the 2019 conference in St. Louis",
    "Beautiful 3 bedroom house for sale in Austin, TX",
    "Women's Summer Dress (Blue, Size M)",
    "A room with the lights on",
    "Top 10 hiking trails in Colorado!",
    "A man with a hat holding a photo of himself holding a photo of himself ad infinitum.",
]


@pytest.mark.parametrize("caption,rule", [*ISSUE_CAPTIONS.items(), *MORE_CAPTIONS.items()])
def test_each_degenerate_caption_gets_its_rule(caption, rule):
    assert rule in CAPTION_RULES
    assert caption_rule(caption, RULES, synthetic=True) == rule


@pytest.mark.parametrize("caption", ALT_TEXT)
def test_ordinary_alt_text_passes(caption):
    assert caption_rule(caption, RULES, synthetic=False) is None


def test_a_second_sentence_cut_off_is_unfinished_only_for_generated_text():
    text = "A man stands near a red bus. Another man waits at the"
    assert caption_rule(text, RULES, synthetic=True) == caption_rule(text, RULES) == UNFINISHED_SENTENCE
    credit = "A man stands near a red bus. Photo by Jane Doe"  # alt-text credits end without a full stop
    assert caption_rule(credit, RULES, synthetic=False) is None
    assert caption_rule(credit, RULES, synthetic=True) == UNFINISHED_SENTENCE
    assert caption_rule(credit + ".", RULES, synthetic=True) is None


def test_the_demo_human_captions_all_pass_the_default_rules():
    captions = [c for s in wds.WebDataset([str(p) for p in DEMO_SHARDS], shardshuffle=False, empty_check=False)
                for c in json.loads(s["json"])["capfilt_demo"]["human_captions"]]
    assert len(captions) == 400
    for synthetic in (False, True):
        assert [c for c in captions if caption_rule(c, RULES, synthetic)] == []


def test_thresholds_are_settings_and_the_rules_switch_off():
    assert caption_rule("a red bus", RULES) is None
    assert caption_rule("a red bus", CaptionRulesConfig(min_words=4)) == TOO_FEW_WORDS
    off = CaptionRulesConfig(enabled=False)
    assert all(caption_rule(c, off, synthetic=True) is None for c in [*ISSUE_CAPTIONS, *MORE_CAPTIONS])


# ----------------------------------------------------------------------------------------------- in a run

BAD_WEB = {"k0": "a 2019-3-7.png", "k1": "the universe 0x5329b7fe-e4ff"}


@pytest.fixture
def shards(tmp_path) -> Path:
    """Demo photos: two with a web caption the rules drop, one whose earlier synthetic captions (a capfilt block)
    are one good and one degenerate, the rest ordinary."""
    samples = demo_samples(8)
    for key, text in BAD_WEB.items():
        samples[int(key[1])] = {**samples[int(key[1])], "__key__": key, "txt": text.encode()}
    meta = json.loads(samples[2]["json"])
    web = samples[2]["txt"].decode()
    meta["capfilt"] = {"candidates": [{"caption": web, "source": "web"},
                                      {"caption": "the city", "source": "synthetic"},
                                      {"caption": "a picture of a street with people walking", "source": "synthetic"}]}
    samples[2] = {**samples[2], "__key__": "k2", "json": json.dumps(meta).encode()}
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "part-00000.tar", samples[:4])
    write_tar(d / "part-00001.tar", samples[4:])
    return d


def filter_run(shards, out, models, *extra):
    result = cli("filter", shards, "--out", out, "--filter", models["blip_itm"], "--batch-size", 3, "--workers", 0,
                 "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return result


def rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def written(out: Path) -> dict[str, dict]:
    samples = wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False, empty_check=False)
    return {s["__key__"]: json.loads(s["json"]) for s in samples}


def test_a_caption_that_fails_a_rule_is_never_scored_nor_kept(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    result = filter_run(shards, out, tiny_models, "--threshold", 0.0)  # every scored caption passes the filter
    got = rows(out)
    for key, text in BAD_WEB.items():  # the image's only caption failed: dropped, never scored
        assert got[key]["web_caption"] == text and got[key]["web_score"] is None
        assert got[key]["status"] == "dropped" and got[key]["reason"] == ALL_FAILED_RULES
        assert got[key]["web_rule"] == caption_rule(text, RULES)
    mixed = got["k2"]
    assert mixed["status"] == "ok" and mixed["synthetic_rules"] == [TOO_FEW_WORDS, None]
    assert mixed["synthetic_scores"][0] is None and mixed["synthetic_scores"][1] is not None
    assert "the city" not in mixed["kept_captions"] and len(mixed["kept_captions"]) == 2
    block = written(out)["k2"]["capfilt"]["candidates"]
    assert [c.get("rule") for c in block] == [None, TOO_FEW_WORDS, None]
    assert [c["kept"] for c in block] == [True, False, True]
    assert set(written(out)) == set(got) - set(BAD_WEB)
    stats = [read_json(p) for p in out.glob("*_stats.json")]
    assert sum(s["captions_scored"] for s in stats) == 8 - len(BAD_WEB) + 1  # 6 web + 1 synthetic
    assert "caption rules    3 captions dropped before scoring" in result.output
    assert read_json(out / MANIFEST)["settings"]["caption_rules"] == {
        "enabled": True, "min_words": 3, "min_alpha": 0.5, "ngram": 3, "max_repeated": 0.5}
    assert cli("report", out, "--samples", 8).exit_code == 0
    html = (out / "report.html").read_text()
    table = html[html.index('id="rules-table"'):]
    table = table[: table.index("</table>")]
    for code, web, synthetic in ((MARKUP_OR_CODE, 1, 0), (TOO_FEW_WORDS, 1, 1)):  # each rule's drops, by source
        assert f'<tr><th>{code}</th><td class="num">{web}</td><td class="num">{synthetic}</td></tr>' in table
    assert f"synthetic\n            {TOO_FEW_WORDS}</span> the city" in html  # the gallery says why it was dropped


def test_no_caption_rules_scores_every_caption(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    filter_run(shards, out, tiny_models, "--threshold", 0.0, "--no-caption-rules")
    got = rows(out)
    assert all(r["status"] == "ok" and r["web_score"] is not None and r["web_rule"] is None for r in got.values())
    assert got["k2"]["synthetic_rules"] == [None, None] and None not in got["k2"]["synthetic_scores"]
    assert "caption_rules" not in read_json(out / MANIFEST)["settings"]
    # An output written without the rules (as every format-2 output was) resumes only with them off.
    again = cli("filter", shards, "--out", out, "--filter", tiny_models["blip_itm"], "--batch-size", 3,
                "--threshold", 0.0, "-q")
    assert again.exit_code == 2 and "other settings (caption_rules)" in again.output
    resumed = cli("filter", shards, "--out", out, "--filter", tiny_models["blip_itm"], "--batch-size", 3,
                  "--threshold", 0.0, "--no-caption-rules")
    assert resumed.exit_code == 0 and "0 shards done, 2 already done" in resumed.output


def test_a_stricter_threshold_still_tells_rule_drops_from_low_scores(shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    filter_run(shards, out, tiny_models, "--threshold", 1.0)  # nothing scores above 1: every image dropped
    reasons = {k: r["reason"] for k, r in rows(out).items()}
    assert {reasons[k] for k in BAD_WEB} == {ALL_FAILED_RULES}
    assert {r for k, r in reasons.items() if k not in BAD_WEB} == {ALL_BELOW_THRESHOLD}


def test_select_keeps_the_recorded_rule_verdicts_byte_for_byte(shards, tmp_path, tiny_models):
    recorded, full, selected = tmp_path / "recorded", tmp_path / "full", tmp_path / "selected"
    filter_run(shards, recorded, tiny_models)
    filter_run(shards, full, tiny_models, "--threshold", 0.0)
    result = cli("select", shards, "--from", recorded, "--out", selected, "--threshold", 0.0, "-q")
    assert result.exit_code == 0, result.output
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00000.tar", "part-00001.tar"):
        assert (selected / name).read_bytes() == (full / name).read_bytes()
