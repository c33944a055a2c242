"""Putting records at the ``k`` closest nodes: ``store``, the republishing of this node's own records, hand-over.

A stored record goes to the ``k`` peers closest to its key that a node lookup finds (and into this node's own
storage if it is among them). This node's own records are republished every ``republish_interval_s`` until they
expire. When a new peer enters the routing table, the stored records it is now among the ``k`` closest to are
handed over to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarm.dht.finder import Finder
from swarm.dht.protocol import PEER_FAILURES
from swarm.dht.records import Record
from swarm.dht.routing import Contact, key_id_of_packed
from swarm.p2p.identity import PeerID

if TYPE_CHECKING:
    from swarm.dht.node import DHT

log = logging.getLogger(__name__)


class Publisher:
    """The records ``node`` puts at other peers, and the own records it keeps republishing."""

    def __init__(self, node: DHT, finder: Finder) -> None:
        self.node = node
        self.finder = finder
        self._own: dict[tuple[bytes, bytes | None], tuple[Record, float]] = {}  # slot -> (record, published at)

    async def store(self, record: Record) -> bool:
        """Publish one of this node's own records and republish it until it expires; True if any node stored it."""
        self._own[record.slot()] = (record, self.node.config.clock())
        return await self.publish(record) > 0

    async def publish(self, record: Record) -> int:
        """Send ``record`` to the k closest nodes to its key; how many stored it (this node included)."""
        node, config = self.node, self.node.config
        key_id = key_id_of_packed(record.key)
        result = await self.finder.nodes(key_id)
        targets = result.closest[: config.bucket_size]
        stored = 0
        if not config.client_mode:
            worst = targets[-1].node_id ^ key_id if targets else 0
            if len(targets) < config.bucket_size or node.table.local_id ^ key_id < worst:
                stored += node.storage.put(key_id, record)
        outcomes = await asyncio.gather(*(self.store_at(c.peer_id, [record]) for c in targets))
        return stored + sum(1 for ok in outcomes if ok and ok[0])

    async def store_at(self, peer_id: PeerID, records: Sequence[Record]) -> list[bool]:
        """STORE ``records`` at one peer; one flag per record ([] if the peer failed)."""
        try:
            return await self.node.protocol.call_store(peer_id, records)
        except PEER_FAILURES as e:
            log.debug("%s: STORE at %s failed: %s", self.node.peer_id.short(), peer_id.short(), e)
            return []

    async def republish_due(self, now: float) -> None:
        """Forget own records that expired; publish again those published ``republish_interval_s`` ago."""
        for slot, (record, published_s) in list(self._own.items()):
            if record.expiration_time <= now:
                del self._own[slot]
            elif now - published_s >= self.node.config.republish_interval_s:
                self._own[slot] = (record, now)
                await self.publish(record)

    def records_for(self, contact: Contact) -> list[Record]:
        """Stored records whose k closest now include ``contact`` (a holder pushed out by it hands over too)."""
        table = self.node.table
        ids = [c.node_id for c in table.contacts() if c.peer_id != contact.peer_id]
        ids.append(table.local_id)
        records = []
        for key_id in self.node.storage.key_ids():
            if _among_closest(contact.node_id, key_id, ids, self.node.config.bucket_size):
                records.extend(self.node.storage.get(key_id))
        return records


def _among_closest(node_id: int, target_id: int, others: Sequence[int], k: int) -> bool:
    """True if fewer than ``k`` of ``others`` are closer to ``target_id`` than ``node_id`` (early exit)."""
    d = node_id ^ target_id
    closer = 0
    for other in others:
        if other ^ target_id < d:
            closer += 1
            if closer >= k:
                return False
    return True
