"""The DHT's wire protocol: typed messages, ``rpc_*`` handlers and ``call_*`` clients over the transport.

Every request names its ``sender`` (PeerID and listen multiaddrs) unless the caller is in client mode;
the server checks that it matches the authenticated PeerID of the connection and adds it to its routing
table (ping-before-evict when the bucket is full). Records received on STORE and in FIND_VALUE answers
go through the :class:`~swarm.dht.records.RecordChecker` (owner signature, limits, validators); bad ones are
dropped with a warning, the rest are served. A STORE lands in storage charged to the sender's PeerID and IP
address (the receiver alone decides what it caches); a FIND_VALUE reply is paged (:mod:`swarm.dht.paging`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from swarm.dht.config import DHTConfig
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress, parse_maddr
from swarm.p2p.messages import Message
from swarm.dht.paging import MAX_CURSOR_BYTES, batches, page
from swarm.dht.records import Record, RecordChecker
from swarm.dht.routing import ID_BYTES, Contact, RoutingTable, id_from_bytes, id_to_bytes, key_id_of_packed
from swarm.dht.storage import RecordStorage
from swarm.p2p import RpcContext, Transport
from swarm.p2p.rpc import UnaryHandler
from swarm.errors import AddressError, IdentityError, ProtocolError, RecordError, SwarmError

log = logging.getLogger(__name__)

ReplyT = TypeVar("ReplyT", bound=Message)

MAX_MADDRS_PER_PEER = 8
MAX_PEERS_PER_REPLY = 1000
_MAX_CACHED_CONTACTS = 50_000
ROUTING_TAG = "dht.routing"  # the transport protects routing-table contacts under this tag (docs/transport.md)


@dataclass(frozen=True, kw_only=True)
class NodeInfo(Message):
    """A peer on the wire: PeerID bytes and its listen multiaddrs."""

    peer_id: bytes
    maddrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.maddrs) > MAX_MADDRS_PER_PEER or any(len(m) > 300 for m in self.maddrs):
            raise ValueError(f"at most {MAX_MADDRS_PER_PEER} multiaddrs of <= 300 characters per peer")


def _check_peers(peers: Sequence[NodeInfo]) -> None:
    if len(peers) > MAX_PEERS_PER_REPLY:
        raise ValueError(f"at most {MAX_PEERS_PER_REPLY} peers per message, got {len(peers)}")


@dataclass(frozen=True, kw_only=True)
class PingRequest(Message):
    sender: NodeInfo | None = None


@dataclass(frozen=True, kw_only=True)
class PingReply(Message):
    peer: NodeInfo


@dataclass(frozen=True, kw_only=True)
class FindNodeRequest(Message):
    sender: NodeInfo | None = None
    target: bytes

    def __post_init__(self) -> None:
        if len(self.target) != ID_BYTES:
            raise ValueError(f"target must be a {ID_BYTES}-byte ID, got {len(self.target)} bytes")


@dataclass(frozen=True, kw_only=True)
class FindNodeReply(Message):
    peers: tuple[NodeInfo, ...] = ()

    def __post_init__(self) -> None:
        _check_peers(self.peers)


@dataclass(frozen=True, kw_only=True)
class FindValueRequest(Message):
    sender: NodeInfo | None = None
    key: bytes  # the msgpack form of the key
    cursor: bytes = b""  # b"": the first page; else the next_cursor of the previous reply

    def __post_init__(self) -> None:
        if len(self.cursor) > MAX_CURSOR_BYTES:
            raise ValueError(f"cursor longer than {MAX_CURSOR_BYTES} bytes")


@dataclass(frozen=True, kw_only=True)
class FindValueReply(Message):
    records: tuple[Record, ...] = ()
    peers: tuple[NodeInfo, ...] = ()
    next_cursor: bytes = b""  # b"": no more records; else send it back for the next page

    def __post_init__(self) -> None:
        _check_peers(self.peers)
        if len(self.next_cursor) > MAX_CURSOR_BYTES:
            raise ValueError(f"next_cursor longer than {MAX_CURSOR_BYTES} bytes")


@dataclass(frozen=True, kw_only=True)
class StoreRequest(Message):
    sender: NodeInfo | None = None
    records: tuple[Record, ...]


@dataclass(frozen=True, kw_only=True)
class StoreReply(Message):
    stored: tuple[bool, ...]


@dataclass(frozen=True, kw_only=True)
class RoutingTableRequest(Message):
    pass


@dataclass(frozen=True, kw_only=True)
class RoutingTableReply(Message):
    peer: NodeInfo
    client_mode: bool
    peers: tuple[NodeInfo, ...] = ()
    buckets: tuple[int, ...] = ()
    num_records: int = 0

    def __post_init__(self) -> None:
        _check_peers(self.peers)
        if len(self.buckets) != len(self.peers):
            raise ValueError("buckets must have one entry per peer")


def to_info(contact: Contact) -> NodeInfo:
    return NodeInfo(peer_id=contact.peer_id.to_bytes(), maddrs=contact.maddrs)


class DHTProtocol:
    """Handlers and clients of one node; owns the routing-table bookkeeping of peers seen on the wire."""

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

    @property
    def peer_id(self) -> PeerID:
        return self.transport.peer_id

    def self_info(self) -> NodeInfo | None:
        """What this node says about itself; None in client mode (so nobody adds it to a routing table)."""
        if self.config.client_mode:
            return None
        return NodeInfo(peer_id=self.peer_id.to_bytes(), maddrs=self.transport.listen_maddrs[:MAX_MADDRS_PER_PEER])

    def _methods(self) -> tuple[tuple[str, type[Message], UnaryHandler], ...]:
        return (
            ("dht.ping", PingRequest, self.rpc_ping),
            ("dht.find_node", FindNodeRequest, self.rpc_find_node),
            ("dht.find_value", FindValueRequest, self.rpc_find_value),
            ("dht.store", StoreRequest, self.rpc_store),
            ("dht.routing_table", RoutingTableRequest, self.rpc_routing_table),
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
        except (SwarmError, OSError, TimeoutError):
            log.debug("%s: evicting %s, it did not answer a ping", self.peer_id.short(), stale.peer_id.short())
            self.peer_failed(stale.peer_id)
        else:
            self.table.add(stale)  # it answered: it stays, now most recently seen
        finally:
            self._pinging.discard(stale.peer_id)

    def _sender_seen(self, ctx: RpcContext, sender: NodeInfo | None) -> None:
        if not self.running:
            raise SwarmError("this DHT node is shutting down; use another peer")
        if sender is None:
            return
        if sender.peer_id != ctx.peer_id.to_bytes():
            raise ProtocolError("sender does not match the authenticated PeerID of the connection")
        contact = self.contact_from(sender, ctx.remote_host)
        if contact is not None:
            self.peer_seen(contact)

    def _nearest_infos(self, target_id: int, exclude: PeerID) -> tuple[NodeInfo, ...]:
        return tuple(to_info(c) for c in self.table.nearest(target_id, self.config.bucket_size, exclude=(exclude,)))

    # -- handlers --

    async def rpc_ping(self, ctx: RpcContext, req: PingRequest) -> PingReply:
        self._sender_seen(ctx, req.sender)
        return PingReply(peer=self.self_info() or NodeInfo(peer_id=self.peer_id.to_bytes()))

    async def rpc_find_node(self, ctx: RpcContext, req: FindNodeRequest) -> FindNodeReply:
        self._sender_seen(ctx, req.sender)
        return FindNodeReply(peers=self._nearest_infos(id_from_bytes(req.target), ctx.peer_id))

    async def rpc_find_value(self, ctx: RpcContext, req: FindValueRequest) -> FindValueReply:
        self._sender_seen(ctx, req.sender)
        if len(req.key) > self.config.max_key_size_bytes:
            raise RecordError(f"key longer than max_key_size_bytes={self.config.max_key_size_bytes}")
        key_id = key_id_of_packed(req.key)
        records, next_cursor = page(
            [r for r in self.local_records(key_id) if r.key == req.key], req.cursor, self.reply_budget_bytes()
        )
        peers = self._nearest_infos(key_id, ctx.peer_id) if not req.cursor else ()
        return FindValueReply(records=tuple(records), peers=peers, next_cursor=next_cursor)

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

    async def rpc_store(self, ctx: RpcContext, req: StoreRequest) -> StoreReply:
        self._sender_seen(ctx, req.sender)
        if len(req.records) > self.config.max_records_per_store:
            raise RecordError(f"at most max_records_per_store={self.config.max_records_per_store} records per STORE")
        stored = []
        for record in req.records:
            try:
                self.checker.check(record)
            except RecordError as e:
                log.warning("%s: rejected a record from %s: %s", self.peer_id.short(), ctx.peer_id.short(), e)
                stored.append(False)
                continue
            key_id = key_id_of_packed(record.key)
            stored.append(self.storage.put(key_id, record, source=ctx.peer_id, host=ctx.remote_host))
        refused = stored.count(False)
        if refused:
            log.debug(
                "%s: refused %d of %d records from %s", self.peer_id.short(), refused, len(stored), ctx.peer_id.short()
            )
        return StoreReply(stored=tuple(stored))

    async def rpc_routing_table(self, ctx: RpcContext, req: RoutingTableRequest) -> RoutingTableReply:
        if not self.running:
            raise SwarmError("this DHT node is shutting down; use another peer")
        contacts = self.table.contacts()[:MAX_PEERS_PER_REPLY]
        return RoutingTableReply(
            peer=self.self_info() or NodeInfo(peer_id=self.peer_id.to_bytes()),
            client_mode=self.config.client_mode,
            peers=tuple(to_info(c) for c in contacts),
            buckets=tuple(self.table.bucket_index(c.node_id) for c in contacts),
            num_records=len(self.storage),
        )

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
