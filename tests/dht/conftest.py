"""Fixtures for the DHT tests."""

from __future__ import annotations

import pytest
from dht_testutil import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
