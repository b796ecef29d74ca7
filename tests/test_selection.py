"""CapFilt selection policies and caption cleaning: pure functions."""

import pytest

from capfilt import CapfiltError
from capfilt.bootstrap.selection import select, unique_candidates
from capfilt.data.schema import Candidate
from capfilt.data.text import clean_caption
from capfilt.settings import SelectionConfig


def scored(*scores):
    return [Candidate(f"c{i}", "web" if i == 0 else "synthetic", s) for i, s in enumerate(scores)]


def test_blip_policy_keeps_every_caption_at_or_over_threshold():
    cands = scored(0.2, 0.5, 0.9, 0.49)
    kept = select(cands, SelectionConfig(policy="blip"))
    assert [c.caption for c in kept] == ["c2", "c1"]  # best first
    assert [c.kept for c in cands] == [False, True, True, False]


def test_blip2_policy_keeps_top_k_among_passing():
    cands = scored(0.7, 0.95, 0.8, 0.1)
    assert [c.caption for c in select(cands, SelectionConfig(policy="blip2", keep_top=2))] == ["c1", "c2"]
    assert [c.kept for c in cands] == [False, True, True, False]
    # The threshold still applies: only one caption passes, so only one is kept.
    assert [c.caption for c in select(scored(0.3, 0.6, 0.2), SelectionConfig(policy="blip2"))] == ["c1"]


def test_all_below_threshold_drops_the_image_and_ties_prefer_web():
    assert select(scored(0.1, 0.2), SelectionConfig()) == []
    assert [c.source for c in select(scored(0.7, 0.7), SelectionConfig(policy="blip2", keep_top=1))] == ["web"]


def test_unique_candidates_drop_empty_and_repeated_captions():
    cands = unique_candidates("a dog", ["a dog", "", "a cat", "a cat"])
    assert [(c.caption, c.source) for c in cands] == [("a dog", "web"), ("a cat", "synthetic")]


@pytest.mark.parametrize("kwargs", [dict(policy="max"), dict(threshold=-0.1), dict(keep_top=0)])
def test_selection_config_validates(kwargs):
    with pytest.raises(CapfiltError):
        SelectionConfig(**kwargs)


def test_clean_caption_matches_blip_pre_caption():
    assert clean_caption('  A "Dog"  (running)!  on: the beach.\n') == "a dog running on the beach"
    assert clean_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
