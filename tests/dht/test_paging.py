"""FIND_VALUE paging: a reply stays within its byte budget, owned subkeys come first, cursors cover every record
exactly once, and a bad cursor is refused."""

from __future__ import annotations

import asyncio

import pytest
from dht_testutil import FakeClock, make_identity

from swarm.dht import owner_subkey
from swarm.dht.paging import follow_pages, page, wire_size_bytes
from swarm.dht.records import Record, make_record
from swarm.dht.routing import Contact
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


async def test_follow_pages_stops_at_loops_limits_and_the_deadline(clock: FakeClock) -> None:
    """Three peers: an honest one with two more pages, one that repeats its cursor forever, one that never
    answers. The honest pages arrive, the loop is cut, and the silent peer costs only the deadline."""
    owned, junk = _dictionary(clock)
    honest, looping, silent = (Contact(make_identity(i).peer_id) for i in (1, 2, 3))
    calls: list[Contact] = []

    async def fetch(contact: Contact, cursor: bytes) -> tuple[list[Record], bytes]:
        calls.append(contact)
        if contact == silent:
            await asyncio.sleep(3600)
        if contact == looping:
            return [junk[0]], b"again"
        return page([*owned, *junk[:40]], cursor, 1024 * 1024)

    first, cursor = page([*owned, *junk[:40]], b"", 1024 * 1024)
    loop = asyncio.get_running_loop()
    start = loop.time()
    starts = [(honest, cursor), (looping, b"again"), (silent, b"x")]
    pages = await follow_pages(fetch, starts, deadline_s=0.5, max_records=1000)
    assert 0.5 <= loop.time() - start < 2.0
    got = [r for contact, records in pages if contact == honest for r in records]
    assert len(first) + len(got) == 43 and calls.count(looping) == 1
    pages = await follow_pages(fetch, [(honest, cursor)], deadline_s=5.0, max_records=1)
    assert len(pages) == 1  # max_records from one peer
