"""Fixtures of the verification tests: seeded identities and an in-memory RecordStore test double."""

from __future__ import annotations

import pytest
from verif_helpers import MemoryStore, make_identity

from swarm.p2p.identity import Identity


@pytest.fixture
def identities() -> list[Identity]:
    return [make_identity(f"peer-{i}") for i in range(8)]


@pytest.fixture
def memory_store() -> MemoryStore:
    return MemoryStore()
