"""Shared fixtures: the demo model, built once per session, and real `hfserve start` servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import ServerProcess, build_demo_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # CI can point HFSERVE_TEST_CACHE at a folder kept between runs; by default build per session.
    shared = os.environ.get("HFSERVE_TEST_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("hfserve-cache")


@pytest.fixture(scope="session")
def demo_model(cache_dir: Path) -> Path:
    return build_demo_model(cache_dir)


@pytest.fixture(scope="session")
def whisper_base_model(cache_dir: Path) -> Path:
    """OpenAI's whisper-base as a Hugging Face folder, built once per cache (about 300 MB)."""
    from model_host.whisper_build import whisper_base

    return whisper_base(cache_dir)


@pytest.fixture(scope="session")
def server(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    """One 4-worker server on the demo model shared by the read-only end-to-end tests."""
    with ServerProcess.start(cache_dir, workers=4) as srv:
        yield srv
