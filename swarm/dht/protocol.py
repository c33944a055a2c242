"""The DHT's protocol endpoint of one node: the peers it sees on the wire and the ``call_*`` clients.

Every request names its ``sender`` (PeerID and listen multiaddrs) unless the caller is in client mode; the
server checks that it matches the authenticated PeerID of the connection and adds it to its routing table
(ping-before-evict when the bucket is full). Records in FIND_VALUE answers go through the
:class:`~swarm.dht.records.RecordChecker` (owner signature, limits, validators); bad ones are dropped with a
warning. The wire messages are in :mod:`swarm.dht.messages`, the ``rpc_*`` handlers in :mod:`swarm.dht.handlers`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from swarm.dht.config import DHTConfig
from swarm.dht.handlers import DHTHandlers
from swarm.dht.messages import (
    MAX_MADDRS_PER_PEER,
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
)
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress, parse_maddr
from swarm.p2p.messages import Message
from swarm.dht.paging import batches
from swarm.dht.records import Record, RecordChecker
from swarm.dht.routing import Contact, RoutingTable, id_to_bytes
from swarm.dht.storage import RecordStorage
from swarm.p2p import RpcContext, Transport
from swarm.p2p.rpc import UnaryHandler
from swarm.errors import AddressError, IdentityError, ProtocolError, RecordError, SwarmError

log = logging.getLogger(__name__)

ReplyT = TypeVar("ReplyT", bound=Message)

_MAX_CACHED_CONTACTS = 50_000
ROUTING_TAG = "dht.routing"  # the transport protects routing-table contacts under this tag (docs/transport.md)
PEER_FAILURES = (SwarmError, OSError, TimeoutError)  # what a call_* raises when the peer fails to answer


class DHTProtocol:
    """Clients of one node (its handlers: ``DHTHandlers``); owns the routing-table bookkeeping of peers seen on
    the wire."""

    def __init__(
        self,
        config: DHTConfig,
        transport: Transport,
        table: RoutingTable,
        storage: RecordStorage,
        cache: RecordStorage,
        checker: RecordChecker,
        spawn: Callable[..., object],
    ) -> None:
        self.config = config
        self.transport = transport
        self.table = table
        self.storage = storage
        self.cache = cache
        self.checker = checker
        self._spawn = spawn  # starts an owned background task
        self._pinging: set[PeerID] = set()
        self._contact_cache: dict[tuple[bytes, tuple[str, ...]], Contact] = {}  # parsing PeerIDs costs
        self.on_new_contact: Callable[[Contact], None] = lambda contact: None
        self.running = False
        self._handlers = DHTHandlers(self)

    @property
    def peer_id(self) -> PeerID:
        return self.transport.peer_id

    def self_info(self) -> NodeInfo | None:
        """What this node says about itself; None in client mode (so nobody adds it to a routing table)."""
        if self.config.client_mode:
            return None
        return NodeInfo(peer_id=self.peer_id.to_bytes(), maddrs=self.transport.advertised_maddrs[:MAX_MADDRS_PER_PEER])

    def _methods(self) -> tuple[tuple[str, type[Message], UnaryHandler], ...]:
        h = self._handlers
        return (
            ("dht.ping", PingRequest, h.rpc_ping),
            ("dht.find_node", FindNodeRequest, h.rpc_find_node),
            ("dht.find_value", FindValueRequest, h.rpc_find_value),
            ("dht.store", StoreRequest, h.rpc_store),
            ("dht.routing_table", RoutingTableRequest, h.rpc_routing_table),
        )

    def register(self) -> None:
        for method, request_type, handler in self._methods():
            self.transport.register(method, request_type, handler)

    def unregister(self) -> None:
        """Stop serving the DHT methods (the transport is shared and stays up) and drop the protection of the
        routing table's contacts."""
        for method, _, _ in self._methods():
            self.transport.unregister(method)
        self.transport.set_protected(ROUTING_TAG, ())

    # -- peers seen --

    def contact_from(self, info: NodeInfo, observed_host: str | None = None) -> Contact | None:
        """A Contact from wire info (None if malformed); remembers its addresses for dialling."""
        cached = self._contact_cache.get((info.peer_id, info.maddrs))
        if cached is not None and (cached.peer_id == self.peer_id or self.transport.addresses(cached.peer_id)):
            return cached
        try:
            peer_id = PeerID(info.peer_id)
        except IdentityError as e:
            log.warning("%s: dropping a peer entry with a bad PeerID: %s", self.peer_id.short(), e)
            return None
        if peer_id == self.peer_id:
            return Contact(peer_id, info.maddrs)
        if info.maddrs:  # a cache miss: new peer or new addresses (e.g. it restarted on another port)
            addrs: list[PeerAddress] = []
            for text in info.maddrs:
                try:
                    addr = parse_maddr(text)
                except AddressError:
                    continue
                if observed_host and addr.host in ("0.0.0.0", "::"):
                    addr = PeerAddress(host=observed_host, port=addr.port, protocol=addr.protocol)
                addrs.append(addr)
            if not addrs:
                return None
            self.transport.add_addresses(peer_id, addrs)
        if len(self._contact_cache) >= _MAX_CACHED_CONTACTS:
            self._contact_cache.clear()
        contact = self._contact_cache[(info.peer_id, info.maddrs)] = Contact(peer_id, info.maddrs)
        return contact

    def peer_seen(self, contact: Contact) -> None:
        """A server-mode peer answered us or called us: update its bucket (ping-before-evict if full)."""
        if contact.peer_id == self.peer_id or not contact.maddrs or not self.running:
            return
        known = contact.peer_id in self.table
        stale = self.table.add(contact)
        if not known and contact.peer_id in self.table:
            self.transport.protect(contact.peer_id, ROUTING_TAG)  # its connections keep their slots
            self.on_new_contact(contact)
        if stale is not None and stale.peer_id not in self._pinging:
            self._pinging.add(stale.peer_id)
            self._spawn(self._ping_before_evict(stale))

    def peer_failed(self, peer_id: PeerID) -> None:
        """A peer did not answer: evict it (the bucket's most recent replacement takes its place)."""
        promoted = self.table.remove(peer_id)
        self.transport.unprotect(peer_id, ROUTING_TAG)
        if promoted is not None:
            self.transport.protect(promoted.peer_id, ROUTING_TAG)
            self.on_new_contact(promoted)

    async def _ping_before_evict(self, stale: Contact) -> None:
        try:
            await self.call_ping(stale.peer_id)
        except PEER_FAILURES:
            log.debug("%s: evicting %s, it did not answer a ping", self.peer_id.short(), stale.peer_id.short())
            self.peer_failed(stale.peer_id)
        else:
            self.table.add(stale)  # it answered: it stays, now most recently seen
        finally:
            self._pinging.discard(stale.peer_id)

    def sender_seen(self, ctx: RpcContext, sender: NodeInfo | None) -> None:
        """A request named its sender: check it against the connection's PeerID and note the peer (handlers call
        this first; it also refuses every request while the node shuts down)."""
        if not self.running:
            raise SwarmError("this DHT node is shutting down; use another peer")
        if sender is None:
            return
        if sender.peer_id != ctx.peer_id.to_bytes():
            raise ProtocolError("sender does not match the authenticated PeerID of the connection")
        contact = self.contact_from(sender, ctx.remote_host)
        if contact is not None:
            self.peer_seen(contact)

    # -- records served --

    def reply_budget_bytes(self) -> int:
        """The most record bytes one reply (or one STORE) carries: ``max_reply_bytes``, within the message cap."""
        return min(self.config.max_reply_bytes, self.transport.config.max_message_size_bytes // 2)

    def local_records(self, key_id: int) -> list[Record]:
        """Stored and cached records of a key, one per (key, subkey), the winning version of each."""
        best: dict[tuple[bytes, bytes | None], Record] = {}
        for record in [*self.storage.get(key_id), *self.cache.get(key_id)]:
            current = best.get(record.slot())
            best[record.slot()] = record if current is None else self.checker.select(current, record)
        return list(best.values())

    # -- clients --

    async def _call(
        self, peer: PeerID | PeerAddress, method: str, request: Message, reply_type: type[ReplyT]
    ) -> ReplyT:
        async with asyncio.timeout(self.config.rpc_timeout_s):
            return await self.transport.call(peer, method, request, reply_type, timeout_s=self.config.rpc_timeout_s)

    async def call_ping(self, peer: PeerID | PeerAddress) -> Contact | None:
        """Ping a peer (dialling an address first if needed); return its Contact, None if it is in client mode."""
        if isinstance(peer, PeerAddress):
            async with asyncio.timeout(self.config.rpc_timeout_s):
                peer = await self.transport.connect(peer)
        reply = await self._call(peer, "dht.ping", PingRequest(sender=self.self_info()), PingReply)
        if reply.peer.peer_id != peer.to_bytes():
            raise ProtocolError(f"{peer.short()} answered a ping in the name of another peer")
        contact = self.contact_from(reply.peer)
        if contact is not None and contact.maddrs:
            self.peer_seen(contact)
        return contact if contact is not None and contact.maddrs else None

    def _contacts(self, peers: Sequence[NodeInfo]) -> list[Contact]:
        contacts = (self.contact_from(info) for info in peers[: self.config.bucket_size])
        return [c for c in contacts if c is not None and c.peer_id != self.peer_id]

    async def call_find_node(self, contact: Contact, target_id: int) -> list[Contact]:
        """Ask ``contact`` for the peers it knows closest to ``target_id``."""
        req = FindNodeRequest(sender=self.self_info(), target=id_to_bytes(target_id))
        reply = await self._call(contact.peer_id, "dht.find_node", req, FindNodeReply)
        self.peer_seen(contact)
        return self._contacts(reply.peers)

    async def call_find_value(
        self, contact: Contact, key: bytes, cursor: bytes = b""
    ) -> tuple[list[Record], list[Contact], bytes]:
        """One page of the records of ``key`` (msgpack form) at ``contact``, closer contacts, and the next cursor
        (b"" when there is no more); bad records are dropped with a warning."""
        req = FindValueRequest(sender=self.self_info(), key=key, cursor=cursor)
        reply = await self._call(contact.peer_id, "dht.find_value", req, FindValueReply)
        self.peer_seen(contact)
        records = []
        for record in reply.records:
            try:
                if record.key != key:
                    raise RecordError("the record is for another key than the one asked for")
                self.checker.check(record)
            except RecordError as e:
                log.warning("%s: dropping a record from %s: %s", self.peer_id.short(), contact.peer_id.short(), e)
                continue
            records.append(record)
        return records, self._contacts(reply.peers), reply.next_cursor

    async def call_store(self, peer: PeerID, records: Sequence[Record]) -> list[bool]:
        """Send records to ``peer`` (in STOREs of at most max_records_per_store records and the reply budget in
        bytes); one flag per record: stored or not."""
        stored: list[bool] = []
        for batch in batches(records, self.config.max_records_per_store, self.reply_budget_bytes()):
            req = StoreRequest(sender=self.self_info(), records=batch)
            reply = await self._call(peer, "dht.store", req, StoreReply)
            if len(reply.stored) != len(req.records):
                raise ProtocolError("STORE reply has a different number of flags than records sent")
            stored.extend(reply.stored)
        return stored

    async def call_routing_table(self, peer: PeerID | PeerAddress) -> RoutingTableReply:
        """The routing table of ``peer`` (for inspection and crawling)."""
        return await self._call(peer, "dht.routing_table", RoutingTableRequest(), RoutingTableReply)
