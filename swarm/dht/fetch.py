"""``get``: a key's records from this node and the network, paged replies followed, the winners merged and cached.

``latest=False`` returns as soon as ``get_quorum`` peers (or this node) answered with the key; ``latest=True``
asks until the k closest peers answered and keeps the newest version of each subkey. A reply larger than
``max_reply_bytes`` is paged: the rest is fetched from the ``alpha`` closest peers that paged
(:func:`~swarm.dht.paging.follow_pages`). Records fetched from other peers are kept in this node's own cache
(``cache_on_path``, for at most ``cache_ttl_s``); nobody else decides what a node caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from swarm.dht.finder import Cursors, Finder
from swarm.dht.paging import follow_pages
from swarm.dht.records import Record, ValueWithExpiration
from swarm.dht.routing import Contact, key_id_of_packed
from swarm.dht.storage import is_owned
from swarm.p2p.messages import packb

if TYPE_CHECKING:
    from swarm.dht.node import DHT

Value = ValueWithExpiration | dict[Any, ValueWithExpiration] | None
Fetched = list[tuple[Contact, list[Record]]]  # the records each peer answered with


class Fetcher:
    """The ``get`` of ``node``."""

    def __init__(self, node: DHT, finder: Finder) -> None:
        self.node = node
        self.finder = finder

    async def get(self, key: str | bytes, latest: bool = False) -> Value:
        """The value of ``key``: a ValueWithExpiration, a {subkey: ValueWithExpiration} dict, or None."""
        config = self.node.config
        key_bytes = packb(key)
        key_id = key_id_of_packed(key_bytes)
        self.finder.last = None
        local = self.node.protocol.local_records(key_id)
        found = list(local)
        if not found or latest:
            cursors: Cursors = {}
            result = await self.finder.values(key_id, key_bytes, None if latest else config.get_quorum, cursors)
            fetched = list(result.found)
            if cursors:  # the rest of paged replies: from the alpha closest peers that paged
                starts = sorted(cursors.values(), key=lambda pair: pair[0].node_id ^ key_id)[: config.alpha]
                fetched.extend(await self._follow_pages(key_bytes, starts))
            for _, records in fetched:
                found.extend(records)
            if config.cache_on_path:
                self._cache_fetched(key_id, fetched, local)
        return _merge(self._winners(found))

    async def _follow_pages(self, key: bytes, starts: Sequence[tuple[Contact, bytes]]) -> Fetched:
        async def fetch(contact: Contact, cursor: bytes) -> tuple[list[Record], bytes]:
            records, _, next_cursor = await self.node.protocol.call_find_value(contact, key, cursor)
            return records, next_cursor

        config = self.node.config
        limit = config.max_subkeys_per_key + 1  # an honest holder has no more records for one key
        return await follow_pages(fetch, starts, deadline_s=config.lookup_timeout_s, max_records=limit)

    def _cache_fetched(
        self, key_id: int, fetched: Sequence[tuple[Contact, Sequence[Record]]], local: Sequence[Record]
    ) -> None:
        """Keep what this node fetched (the winning versions it does not hold already) in its cache."""
        config = self.node.config
        source = {id(r): contact.peer_id for contact, records in fetched for r in records}
        held = {r.slot(): r for r in local}
        keep_until = config.clock() + config.cache_ttl_s
        for record in self._winners([r for _, records in fetched for r in records]):
            if held.get(record.slot()) != record:
                self.node.cache.put(key_id, record, source=source[id(record)], keep_until=keep_until)

    def _winners(self, records: Sequence[Record]) -> list[Record]:
        """The unexpired winning version of each (key, subkey)."""
        now = self.node.config.clock()
        best: dict[tuple[bytes, bytes | None], Record] = {}
        for record in records:
            if record.expiration_time <= now:
                continue
            current = best.get(record.slot())
            best[record.slot()] = record if current is None else self.node.checker.select(current, record)
        return list(best.values())


def _merge(records: Sequence[Record]) -> Value:
    plain = next((r for r in records if r.subkey is None), None)
    subs = [r for r in records if r.subkey is not None]
    if plain is not None and (
        not subs or (plain.expiration_time > max(r.expiration_time for r in subs) and not any(map(is_owned, subs)))
    ):  # a plain value never hides owner-signed subkeys, as in storage
        return plain.with_value()
    if subs:
        return {r.unpacked_subkey(): r.with_value() for r in subs}
    return None
