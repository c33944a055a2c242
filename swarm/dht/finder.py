"""The lookups of one DHT node: its iterative lookup (:mod:`swarm.dht.lookup`) run over its protocol.

A node lookup asks for the peers closest to an ID (FIND_NODE); a value lookup asks for a key's records
(FIND_VALUE) and notes, per peer, the cursor of a paged reply so the caller can fetch the rest. A peer that fails
to answer is evicted from the routing table. ``last`` is the most recent lookup's result (for inspection).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from swarm.dht.lookup import LookupParams, LookupReply, LookupResult, iterative_lookup
from swarm.dht.protocol import PEER_FAILURES
from swarm.dht.routing import Contact, node_id_of
from swarm.p2p.identity import PeerID

if TYPE_CHECKING:
    from swarm.dht.node import DHT

Cursors = dict[PeerID, tuple[Contact, bytes]]  # the peers whose FIND_VALUE reply was paged, and their cursors


class Finder:
    """Node and value lookups of ``node`` (seeded by its node ID, so its random refresh targets are too)."""

    def __init__(self, node: DHT) -> None:
        self.node = node
        self.last: LookupResult | None = None
        self._rng = random.Random(node_id_of(node.peer_id))

    def random_id_in_bucket(self, index: int) -> int:
        """A random ID in the range of bucket ``index`` (the target of a bucket refresh)."""
        return self.node.table.random_id_in_bucket(index, self._rng)

    def _params(self, value_quorum: int | None = None, width: int | None = None) -> LookupParams:
        c = self.node.config
        return LookupParams(
            k=width or c.bucket_size,
            alpha=c.alpha,
            call_timeout_s=c.rpc_timeout_s + 0.5,
            slow_after_s=c.slow_after_s,
            deadline_s=c.lookup_timeout_s,
            value_quorum=value_quorum,
        )

    async def _ask(self, contact: Contact, request: Callable[[], Awaitable[LookupReply]]) -> LookupReply:
        try:
            return await request()
        except PEER_FAILURES:
            self.node.protocol.peer_failed(contact.peer_id)
            raise

    async def nodes(self, target_id: int, width: int | None = None) -> LookupResult:
        """The peers closest to ``target_id`` (``width`` of them, default bucket_size)."""

        async def call(contact: Contact) -> LookupReply:
            return await self._ask(contact, lambda: self._find_node(contact, target_id))

        initial = self.node.table.nearest(target_id, width or self.node.config.bucket_size)
        params = self._params(width=width)
        result = await iterative_lookup(target_id, initial, call, params, exclude=(self.node.peer_id,))
        self.last = result
        return result

    async def _find_node(self, contact: Contact, target_id: int) -> LookupReply:
        return LookupReply(await self.node.protocol.call_find_node(contact, target_id))

    async def values(self, key_id: int, key: bytes, quorum: int | None, cursors: Cursors) -> LookupResult:
        """The records of ``key`` (msgpack form) from the peers closest to it, until ``quorum`` peers answered
        with records (None: until the k closest answered); paged replies leave their cursor in ``cursors``."""

        async def call(contact: Contact) -> LookupReply:
            return await self._ask(contact, lambda: self._find_value(contact, key, cursors))

        initial = self.node.table.nearest(key_id, self.node.config.bucket_size)
        params = self._params(quorum or 10**9)
        result = await iterative_lookup(key_id, initial, call, params, exclude=(self.node.peer_id,))
        self.last = result
        return result

    async def _find_value(self, contact: Contact, key: bytes, cursors: Cursors) -> LookupReply:
        records, contacts, cursor = await self.node.protocol.call_find_value(contact, key)
        if cursor:
            cursors[contact.peer_id] = (contact, cursor)
        return LookupReply(contacts, records)
