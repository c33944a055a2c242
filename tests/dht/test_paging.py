"""FIND_VALUE paging: a reply stays within its byte budget, owned subkeys come first, cursors cover every record
exactly once, and a bad cursor is refused."""

from __future__ import annotations

import pytest
from dht_testutil import FakeClock, make_identity

from swarm.dht import owner_subkey
from swarm.dht.paging import page, wire_size_bytes
from swarm.dht.records import Record, make_record
from swarm.errors import ProtocolError
from swarm.p2p.messages import packb

VALUE = bytes(60 * 1024)


def _dictionary(clock: FakeClock) -> tuple[list[Record], list[Record]]:
    owners = [make_identity(i) for i in range(3)]
    owned = [
        make_record("k", f"o{i}", clock() + 30, subkey=owner_subkey(o.peer_id), identity=o)
        for i, o in enumerate(owners)
    ]
    junk = [make_record("k", VALUE, clock() + 30, subkey=f"junk{i:03d}") for i in range(200)]
    return owned, junk


def test_pages_stay_within_budget_owned_first_and_cover_everything_once(clock: FakeClock) -> None:
    owned, junk = _dictionary(clock)
    budget = 1024 * 1024
    records, cursor, pages = [*junk[:100], *owned, *junk[100:]], b"", []
    while True:
        chunk, cursor = page(records, cursor, budget)
        assert sum(wire_size_bytes(r) for r in chunk) <= budget
        pages.append(chunk)
        if not cursor:
            break
    assert len(pages) == 12  # 200 x 60 KB, 17 to a page of 1 MiB
    assert pages[0][:3] == sorted(owned, key=lambda r: r.subkey or b"")
    seen = [r for chunk in pages for r in chunk]
    assert len(seen) == len(records) and {r.subkey for r in seen} == {r.subkey for r in records}


def test_a_key_that_fits_is_sent_whole_without_a_cursor(clock: FakeClock) -> None:
    owned, junk = _dictionary(clock)
    assert page([*owned, *junk[:5]], b"", 1024 * 1024) == ([*owned, *junk[:5]], b"")


@pytest.mark.parametrize("cursor", [b"\xc1", packb([7, b"x"]), packb("text"), packb([1, "not-bytes"])])
def test_a_malformed_cursor_is_refused(clock: FakeClock, cursor: bytes) -> None:
    owned, _ = _dictionary(clock)
    with pytest.raises(ProtocolError):
        page(owned, cursor, 1024 * 1024)
