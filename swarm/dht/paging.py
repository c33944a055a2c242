"""Paging of FIND_VALUE replies: one reply never carries more than a byte budget of records.

A key's records that fit the budget whole are sent whole, with no cursor. Otherwise they are ordered (the plain
value, then owned subkeys, then unowned ones, each group by subkey bytes) and a reply holds those after the
request's cursor that fit; if more remain it carries a cursor (the position of its last record) that the client
sends back for the next page. Owned subkeys therefore come in the first pages, whatever junk a key holds.
The client side, :func:`follow_pages`, fetches the further pages of several peers in parallel under one
deadline. STOREs are split the same way (:func:`batches`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from swarm.dht.records import Record
from swarm.dht.routing import Contact
from swarm.dht.storage import is_owned
from swarm.errors import ProtocolError, SwarmError
from swarm.p2p.messages import packb, unpackb

log = logging.getLogger(__name__)

RECORD_WIRE_OVERHEAD_BYTES = 96  # msgpack field names and headers of one Record
MAX_CURSOR_BYTES = (1 << 20) + 64  # a subkey (at most max_key_size_bytes <= 1 MiB) and a rank

Position = tuple[int, bytes]


def wire_size_bytes(record: Record) -> int:
    """An upper bound of the bytes ``record`` takes in a message."""
    return (
        len(record.key)
        + len(record.subkey or b"")
        + len(record.value)
        + len(record.signature)
        + RECORD_WIRE_OVERHEAD_BYTES
    )


def position(record: Record) -> Position:
    """Where ``record`` stands in the page order: (0 plain | 1 owned | 2 unowned, subkey bytes)."""
    if record.subkey is None:
        return (0, b"")
    return (1 if is_owned(record) else 2, record.subkey)


def encode_cursor(pos: Position) -> bytes:
    return packb([pos[0], pos[1]])


def decode_cursor(cursor: bytes) -> Position | None:
    """The position a cursor names (None for b"", the first page); ProtocolError if it is malformed."""
    if not cursor:
        return None
    obj = unpackb(cursor, max_size_bytes=MAX_CURSOR_BYTES)
    if not (isinstance(obj, list) and len(obj) == 2 and obj[0] in (0, 1, 2) and isinstance(obj[1], bytes)):
        raise ProtocolError("malformed FIND_VALUE cursor; send back the next_cursor of the previous reply")
    return (int(obj[0]), obj[1])


def page(records: Sequence[Record], cursor: bytes, budget_bytes: int) -> tuple[list[Record], bytes]:
    """The records of one reply after ``cursor`` within ``budget_bytes``, and the next cursor (b"" at the end)."""
    after = decode_cursor(cursor)
    if after is None and sum(wire_size_bytes(r) for r in records) <= budget_bytes:
        return list(records), b""
    ordered = sorted(((position(r), r) for r in records), key=lambda pair: pair[0])
    chosen: list[Record] = []
    used = 0
    last: Position | None = None
    for pos, record in ordered:
        if after is not None and pos <= after:
            continue
        size = wire_size_bytes(record)
        if chosen and used + size > budget_bytes:
            return chosen, encode_cursor(last or pos)
        chosen.append(record)
        used += size
        last = pos
    return chosen, b""


def batches(records: Sequence[Record], max_count: int, budget_bytes: int) -> list[tuple[Record, ...]]:
    """``records`` in groups of at most ``max_count`` records and ``budget_bytes`` (one record at least)."""
    groups: list[tuple[Record, ...]] = []
    group: list[Record] = []
    used = 0
    for record in records:
        size = wire_size_bytes(record)
        if group and (len(group) >= max_count or used + size > budget_bytes):
            groups.append(tuple(group))
            group, used = [], 0
        group.append(record)
        used += size
    if group:
        groups.append(tuple(group))
    return groups


Fetch = Callable[[Contact, bytes], Awaitable[tuple[list[Record], bytes]]]  # (peer, cursor) -> (records, next)


async def follow_pages(
    fetch: Fetch, starts: Sequence[tuple[Contact, bytes]], *, deadline_s: float, max_records: int
) -> list[tuple[Contact, list[Record]]]:
    """The further pages of each ``(peer, cursor)`` in ``starts``, all peers in parallel, within ``deadline_s``.

    A peer's pages end at an empty cursor, a failed page, a cursor it sent before, or ``max_records`` records
    (or pages) from it. What arrived by the deadline is returned, as (peer, records of one page) pairs.
    """
    pages: list[tuple[Contact, list[Record]]] = []

    async def one_peer(contact: Contact, cursor: bytes) -> None:
        seen = {cursor}
        records_left = pages_left = max_records
        while cursor and records_left > 0 and pages_left > 0:
            try:
                records, cursor = await fetch(contact, cursor)
            except (SwarmError, OSError, TimeoutError) as e:
                log.debug("paging: a page from %s failed: %s", contact.peer_id.short(), e)
                return
            pages.append((contact, records))
            records_left -= len(records)
            pages_left -= 1
            if cursor in seen:
                return  # a peer that sends us round in circles
            seen.add(cursor)

    try:
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*(one_peer(contact, cursor) for contact, cursor in starts))
    except TimeoutError:
        log.debug("paging: stopped following %d peers' pages at the %.1f s deadline", len(starts), deadline_s)
    return pages
