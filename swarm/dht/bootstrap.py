"""Joining the DHT through ``initial_peers``: ping them, look ourselves up, refresh the farther buckets.

At least one initial peer must answer (BootstrapError otherwise). A wider self-lookup (``2 * bucket_size``)
lets the nodes around us learn of us and hand over the keys we now hold; with ``join_refresh`` every bucket
farther than our nearest peer's is refreshed too. No initial peers (or only ourselves): a new swarm starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from swarm.dht.finder import Finder
from swarm.dht.protocol import PEER_FAILURES
from swarm.dht.routing import ID_BITS, Contact
from swarm.p2p.maddr import parse_maddr
from swarm.errors import BootstrapError

if TYPE_CHECKING:
    from swarm.dht.node import DHT

log = logging.getLogger(__name__)


async def bootstrap(node: DHT, finder: Finder) -> None:
    """Join the swarm through ``node.config.initial_peers`` (see the module docstring)."""
    config, table = node.config, node.table
    peers = [m for m in config.initial_peers if parse_maddr(m).peer_id != node.peer_id]  # not ourselves
    if not peers:
        log.info("%s: no initial peers: starting a new swarm", node.peer_id.short())
        return
    outcomes = await asyncio.gather(*(_ping_initial(node, m) for m in peers))
    errors = [o for o in outcomes if isinstance(o, str)]
    if len(errors) == len(peers):
        raise BootstrapError(
            f"none of the {len(peers)} initial peers answered ({'; '.join(errors)[:600]}); check the "
            "multiaddrs and that those nodes run, or start without initial peers to begin a new swarm"
        )
    # a wider self-lookup at join: the nodes around us learn of us and hand over the keys we now hold
    await finder.nodes(table.local_id, width=2 * config.bucket_size)
    if config.join_refresh and len(table):
        nearest = table.nearest(table.local_id, 1)[0]
        farther = range(table.bucket_index(nearest.node_id) + 1, ID_BITS)
        await asyncio.gather(*(finder.nodes(finder.random_id_in_bucket(i)) for i in farther))
    for i in range(ID_BITS):
        table.mark_refreshed(i)
    log.info("%s: joined the DHT, %d peers known", node.peer_id.short(), len(table))


async def _ping_initial(node: DHT, maddr: str) -> Contact | str | None:
    try:
        return await node.protocol.call_ping(parse_maddr(maddr))
    except PEER_FAILURES as e:
        log.warning("%s: initial peer %s did not answer: %s", node.peer_id.short(), maddr, e)
        return f"{maddr}: {e}"
