from __future__ import annotations

from pathlib import Path

import pytest

from swarm.data.manifest import Manifest
from tests.data.corpus import make_shards


@pytest.fixture(scope="session")
def built_shards(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Shards built once per session; tests that damage files copy the folder first (`shards`)."""
    return make_shards(tmp_path_factory.mktemp("built"))


@pytest.fixture
def shards(built_shards: Manifest, tmp_path: Path) -> Path:
    """A private copy of the built shard folder; returns its manifest path."""
    import shutil

    shutil.copytree(built_shards.folder, tmp_path / "shards")
    return tmp_path / "shards" / "manifest.json"
