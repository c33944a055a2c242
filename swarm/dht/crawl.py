"""Crawling: every reachable server peer, found by asking each known peer for its routing table (bounded).

Peers are asked 16 at a time, breadth first from this node's routing table, until ``max_peers`` answered or
nobody new is left; a peer that does not answer is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from swarm.dht.messages import RoutingTableReply
from swarm.dht.protocol import PEER_FAILURES
from swarm.p2p.identity import PeerID

if TYPE_CHECKING:
    from swarm.dht.node import DHT

log = logging.getLogger(__name__)

_BATCH = 16  # routing tables asked for at once


async def crawl(node: DHT, limit: int) -> list[RoutingTableReply]:
    """The routing tables of up to ``limit`` reachable server peers."""
    seen: set[PeerID] = {node.peer_id}
    queue: list[PeerID] = []
    for contact in node.table.contacts():
        seen.add(contact.peer_id)
        queue.append(contact.peer_id)
    answers: list[RoutingTableReply] = []
    while queue and len(answers) < limit:
        batch, queue = queue[:_BATCH], queue[_BATCH:]
        replies = await asyncio.gather(*(_routing_table_of(node, p) for p in batch))
        for reply in replies:
            if reply is None:
                continue
            answers.append(reply)
            for info in reply.peers:
                found = node.protocol.contact_from(info)
                if found is not None and found.peer_id not in seen:
                    seen.add(found.peer_id)
                    queue.append(found.peer_id)
    return answers[:limit]


async def _routing_table_of(node: DHT, peer_id: PeerID) -> RoutingTableReply | None:
    try:
        return await node.protocol.call_routing_table(peer_id)
    except PEER_FAILURES as e:
        log.debug("%s: crawl: %s did not answer: %s", node.peer_id.short(), peer_id.short(), e)
        return None
