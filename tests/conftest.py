"""The tests' fixtures: tiny BLIP / BLIP-2 captioners and filters built from configs, saved, and loaded back
through `from_pretrained(dir)` exactly as a user's checkpoint is; an isolated HF_HOME; capfilt's logging. What
tests import (shard builders, readers, the CLI runner) is in helpers.py."""

from __future__ import annotations

import os

import pytest

from capfilt.testing import build_tiny_models


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    # datasets writes lock files under HF_HOME even with cache_dir; never the user's or CI's home.
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _capfilt_logging():
    """capfilt's messages on stderr, as the CLI sets them up, also where a test calls the library directly."""
    from capfilt import log

    log.configure()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of saved tiny checkpoints: blip_captioner, blip_itm, blip2_captioner, blip2_itm."""
    return build_tiny_models(tmp_path_factory.mktemp("models"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
