"""The DHT's ``rpc_*`` handlers: what one node answers to PING, FIND_NODE, FIND_VALUE, STORE and ROUTING_TABLE.

Each handler first checks the request's ``sender`` against the connection's authenticated PeerID and adds it to
the routing table (``DHTProtocol.sender_seen``). A STORE lands in storage charged to the sender's PeerID and IP
address after the :class:`~swarm.dht.records.RecordChecker` accepted each record (bad ones are refused with a
warning); a FIND_VALUE reply is paged (:mod:`swarm.dht.paging`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from swarm.dht.messages import (
    MAX_PEERS_PER_REPLY,
    FindNodeReply,
    FindNodeRequest,
    FindValueReply,
    FindValueRequest,
    NodeInfo,
    PingReply,
    PingRequest,
    RoutingTableReply,
    RoutingTableRequest,
    StoreReply,
    StoreRequest,
    to_info,
)
from swarm.dht.paging import page
from swarm.dht.routing import id_from_bytes, key_id_of_packed
from swarm.p2p import RpcContext
from swarm.p2p.identity import PeerID
from swarm.errors import RecordError, SwarmError

if TYPE_CHECKING:
    from swarm.dht.protocol import DHTProtocol

log = logging.getLogger(__name__)


class DHTHandlers:
    """The handlers of one node's DHT protocol (``DHTProtocol.register`` serves them on the transport)."""

    def __init__(self, protocol: DHTProtocol) -> None:
        self.protocol = protocol

    @property
    def peer_id(self) -> PeerID:
        return self.protocol.peer_id

    def _own_info(self) -> NodeInfo:
        """What this node says about itself in a reply (its bare PeerID in client mode)."""
        return self.protocol.self_info() or NodeInfo(peer_id=self.peer_id.to_bytes())

    def _nearest_infos(self, target_id: int, exclude: PeerID) -> tuple[NodeInfo, ...]:
        p = self.protocol
        return tuple(to_info(c) for c in p.table.nearest(target_id, p.config.bucket_size, exclude=(exclude,)))

    async def rpc_ping(self, ctx: RpcContext, req: PingRequest) -> PingReply:
        self.protocol.sender_seen(ctx, req.sender)
        return PingReply(peer=self._own_info())

    async def rpc_find_node(self, ctx: RpcContext, req: FindNodeRequest) -> FindNodeReply:
        self.protocol.sender_seen(ctx, req.sender)
        return FindNodeReply(peers=self._nearest_infos(id_from_bytes(req.target), ctx.peer_id))

    async def rpc_find_value(self, ctx: RpcContext, req: FindValueRequest) -> FindValueReply:
        p = self.protocol
        p.sender_seen(ctx, req.sender)
        if len(req.key) > p.config.max_key_size_bytes:
            raise RecordError(f"key longer than max_key_size_bytes={p.config.max_key_size_bytes}")
        key_id = key_id_of_packed(req.key)
        records, next_cursor = page(
            [r for r in p.local_records(key_id) if r.key == req.key], req.cursor, p.reply_budget_bytes()
        )
        peers = self._nearest_infos(key_id, ctx.peer_id) if not req.cursor else ()
        return FindValueReply(records=tuple(records), peers=peers, next_cursor=next_cursor)

    async def rpc_store(self, ctx: RpcContext, req: StoreRequest) -> StoreReply:
        p = self.protocol
        p.sender_seen(ctx, req.sender)
        if len(req.records) > p.config.max_records_per_store:
            raise RecordError(f"at most max_records_per_store={p.config.max_records_per_store} records per STORE")
        stored = []
        for record in req.records:
            try:
                p.checker.check(record)
            except RecordError as e:
                log.warning("%s: rejected a record from %s: %s", self.peer_id.short(), ctx.peer_id.short(), e)
                stored.append(False)
                continue
            key_id = key_id_of_packed(record.key)
            stored.append(p.storage.put(key_id, record, source=ctx.peer_id, host=ctx.remote_host))
        refused = stored.count(False)
        if refused:
            log.debug(
                "%s: refused %d of %d records from %s", self.peer_id.short(), refused, len(stored), ctx.peer_id.short()
            )
        return StoreReply(stored=tuple(stored))

    async def rpc_routing_table(self, ctx: RpcContext, req: RoutingTableRequest) -> RoutingTableReply:
        p = self.protocol
        if not p.running:
            raise SwarmError("this DHT node is shutting down; use another peer")
        contacts = p.table.contacts()[:MAX_PEERS_PER_REPLY]
        return RoutingTableReply(
            peer=self._own_info(),
            client_mode=p.config.client_mode,
            peers=tuple(to_info(c) for c in contacts),
            buckets=tuple(p.table.bucket_index(c.node_id) for c in contacts),
            num_records=len(p.storage),
        )
