"""Transport: one node's encrypted RPC endpoint: lifecycle, handler registry, protected peers, the call API.

The work is done by its parts: ``listener.py`` (listening and admitting inbound connections), ``dialer.py``
(the address book and dials), ``conntable.py`` (the connections by peer), ``dispatch.py`` (a request to its
handler), ``admission.py`` (the connection budgets); the transport wires them together, is the owner every
connection reports to, and runs the idle-connection reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.maddr import PeerAddress
from swarm.p2p.messages import Message
from swarm.p2p import rpc
from swarm.p2p.admission import Admission
from swarm.p2p.circuit import CircuitRecord
from swarm.p2p.refusal import encode_refusal
from swarm.p2p.circuit import RELAY_UNAVAILABLE
from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.conntable import ConnectionTable, PeerCallback
from swarm.p2p.endpoint import Endpoint
from swarm.p2p.dialer import Dialer, PeerLike
from swarm.p2p.dispatch import dispatch_request
from swarm.p2p.framing import Chunk, Frame, WriteScratch
from swarm.p2p.listener import Listener
from swarm.p2p.rpc import HandlerEntry, StreamHandler, StreamReply, UnaryHandler
from swarm.p2p.streams import Stream
from swarm.p2p.latency import CallLatency
from swarm.p2p.traffic import Traffic
from swarm.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class Transport:
    """The encrypted, multiplexed RPC transport of one node (see docs/transport.md)."""

    def __init__(self, identity: Identity, config: TransportConfig) -> None:
        self.identity = identity
        self.config = config
        self._static_key = X25519PrivateKey.generate()
        self._scratch = WriteScratch()
        self.traffic = Traffic()  # bytes per RPC method family, both directions (see traffic.py)
        self.latency = CallLatency()  # how long this node's calls take, per method (see latency.py)
        self._handlers: dict[str, HandlerEntry] = {}
        self._table = ConnectionTable(identity.peer_id)
        self._admission = Admission(config, log, identity.peer_id.short())  # the connection budgets
        endpoint = Endpoint(
            identity=identity,
            static_key=self._static_key,
            config=config,
            admission=self._admission,
            table=self._table,
            establish=self._establish,
            on_circuit=self._on_circuit,
        )
        self._dialer = Dialer(endpoint, make_connection=self._outbound_protocol)
        self._listener = Listener(endpoint, make_connection=self._inbound_protocol)
        self._listen_maddrs: tuple[str, ...] = ()
        self._circuit_handler: Callable[[Connection, CircuitRecord], None] | None = None
        self._advertised: tuple[str, ...] | None = None  # None: the listen addresses (see set_advertised)
        self._reachability = "unknown"
        self._reaper: asyncio.Task[None] | None = None
        self._running = False

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def listen_maddrs(self) -> tuple[str, ...]:
        """The multiaddrs we listen on, with the real ports and ``/p2p/<PeerID>``."""
        return self._listen_maddrs

    @property
    def advertised_maddrs(self) -> tuple[str, ...]:
        """The multiaddrs other peers should dial us at: the listen addresses until a reachability check
        (``reachability.py``) says otherwise (the dialled-back addresses, or circuit addresses through relays)."""
        return self._listen_maddrs if self._advertised is None else self._advertised

    @property
    def reachability(self) -> str:
        """``unknown``, ``public`` (dialled back), ``relayed`` (behind NAT, reachable through relays) or
        ``private`` (behind NAT, no relay yet): what this node's peer record says."""
        return self._reachability

    def set_advertised(self, maddrs: tuple[str, ...] | None, reachability: str) -> None:
        """Set what `advertised_maddrs` and `reachability` say (None: the listen addresses)."""
        self._advertised, self._reachability = maddrs, reachability

    def set_circuit_handler(self, handler: Callable[[Connection, CircuitRecord], None] | None) -> None:
        """Hand circuit requests that reach our listener to ``handler`` (the relay service); None refuses them."""
        self._circuit_handler = handler

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on every ``listen_maddrs`` entry and start the idle-connection reaper."""
        self._running = True
        try:
            maddrs = await self._listener.listen(self.config.listen_maddrs)
        except BaseException:
            await self.stop()
            raise
        self._listen_maddrs = tuple(maddrs)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        log.debug("transport %s listening on %s", self.peer_id.short(), maddrs)

    async def stop(self) -> None:
        """Close listeners and connections, cancel every task this transport owns, and wait for them. Each
        connection lingers until its peer has read what we wrote, at most ``close_linger_s`` (docs/transport.md)."""
        self._running = False
        self._listener.close()
        tasks: list[asyncio.Task[Any]] = [*self._listener.tasks, *self._dialer.tasks]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        self._admission.close_all()
        linger_s = self.config.close_linger_s
        for conn in list(self._table.all):
            # what we wrote last (e.g. an all-reduce's results) still reaches the peer, for at most close_linger_s
            conn.close("the transport is stopping", warn=False, linger_s=linger_s)
            tasks.extend(conn.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=max(self.config.write_timeout_s, linger_s))
        await self._listener.wait_closed()
        self._table.clear()
        self._reaper = None

    # -- registration and address book --

    def register(self, method: str, request_type: type[Message], handler: UnaryHandler) -> None:
        """Serve ``method``: ``async handler(ctx, request) -> Message``."""
        self._register(HandlerEntry(method=method, request_type=request_type, handler=handler, streaming=False))

    def register_stream(self, method: str, request_type: type[Message], handler: StreamHandler) -> None:
        """Serve streaming ``method``: ``async handler(ctx, request, chunks) -> (reply, reply_chunks | None)``."""
        self._register(HandlerEntry(method=method, request_type=request_type, handler=handler, streaming=True))

    def unregister(self, method: str) -> None:
        """Stop serving ``method`` (a component sharing the transport shut down); requests for it then get
        ``unknown_method``. A no-op if it is not registered."""
        self._handlers.pop(method, None)

    def _register(self, entry: HandlerEntry) -> None:
        if entry.method in self._handlers:
            raise ConfigError(f"method {entry.method!r} is already registered on this transport")
        if not (isinstance(entry.request_type, type) and issubclass(entry.request_type, Message)):
            raise ConfigError(f"request_type of {entry.method!r} must be a Message subclass")
        self._handlers[entry.method] = entry

    def add_addresses(self, peer_id: PeerID, addrs: Iterable[PeerAddress]) -> None:
        """Remember where ``peer_id`` listens (used when dialling it by PeerID); newest first."""
        self._dialer.add_addresses(peer_id, addrs)

    def addresses(self, peer_id: PeerID) -> tuple[PeerAddress, ...]:
        return self._dialer.addresses(peer_id)

    def on_peer_connected(self, callback: PeerCallback) -> None:
        """Call ``callback(peer_id, remote_address)`` when a peer gets its first open connection."""
        self._table.on_connected.append(callback)

    def on_peer_disconnected(self, callback: PeerCallback) -> None:
        """Call ``callback(peer_id, remote_address)`` when a peer's last connection closes."""
        self._table.on_disconnected.append(callback)

    def connected_peers(self) -> list[PeerID]:
        return self._table.connected_peers()

    def is_connected(self, peer_id: PeerID) -> bool:
        return self._table.open_connection(peer_id) is not None

    def known_peers(self) -> list[PeerID]:
        """Peers with a direct (not circuit) address in the address book."""
        return self._dialer.direct_peers()

    async def disconnect(self, peer_id: PeerID) -> None:
        """Close every connection to ``peer_id`` (in-flight requests fail with TransportError); what we wrote
        still reaches it, for at most ``close_linger_s`` (the connections linger in the background)."""
        for conn in list(self._table.by_peer.get(peer_id, ())):
            conn.close("disconnected on request", warn=False, linger_s=self.config.close_linger_s)

    # -- protected peers (docs/transport.md, "Connection budgets") --

    def protect(self, peer_id: PeerID, tag: str) -> None:
        """Mark ``peer_id`` as needed by the component ``tag`` (e.g. ``"dht.routing"``): its connections are
        never evicted, may use the slots reserved for protected peers, and skip the per-address cap."""
        self._admission.budget.protect(peer_id, tag)

    def unprotect(self, peer_id: PeerID, tag: str) -> bool:
        """Drop ``tag``'s protection of ``peer_id``; True if another tag still protects it."""
        return self._admission.budget.unprotect(peer_id, tag)

    def set_protected(self, tag: str, peers: Iterable[PeerID]) -> None:
        """Make ``peers`` exactly the peers ``tag`` protects (protects the new ones, unprotects the dropped ones)."""
        self._admission.budget.set_protected(tag, peers)

    def is_protected(self, peer_id: PeerID) -> bool:
        return self._admission.budget.is_protected(peer_id)

    def protected_peers(self, tag: str | None = None) -> set[PeerID]:
        """The peers ``tag`` protects (any tag if None)."""
        return self._admission.budget.protected_peers(tag)

    def connection_counts(self) -> dict[str, int]:
        """``pending`` (inbound handshakes) and ``established`` connections, as the budgets count them."""
        budget = self._admission.budget
        return {"pending": budget.pending_count, "established": budget.established_count}

    # -- calls --

    async def connect(self, peer: PeerLike) -> PeerID:
        """Dial ``peer`` (or reuse the open connection) and return its authenticated PeerID."""
        conn = await self._connection(peer)
        if conn.peer_id is None:  # _connection returns only connections whose handshake finished
            raise TransportError("internal: a connection without an authenticated peer id")
        return conn.peer_id

    async def call(
        self, peer: PeerLike, method: str, request: Message, reply_type: type[M], *, timeout_s: float | None = None
    ) -> M:
        """Send one request and return the typed reply; RpcTimeoutError, RemoteError, TransportError on failure."""
        timeout_s = timeout_s or self.config.rpc_timeout_s
        started, ok = time.monotonic(), False
        try:
            conn = await self._connection(peer)  # bounded by connect_timeout_s + handshake_timeout_s
            reply = await rpc.call(conn, method, request, reply_type, timeout_s)
            ok = True
            return reply
        finally:
            self.latency.observe(method, time.monotonic() - started, ok=ok)

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        peer: PeerLike,
        method: str,
        header: Message,
        reply_type: type[M],
        *,
        chunks: AsyncIterable[Chunk] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamReply[M]]:
        """Open a stream: send ``header`` and ``chunks``; yields a StreamReply (``reply``, ``chunks()``).

        ``timeout_s`` bounds each wait (the reply header, each chunk, each window grant), so a stalled peer
        fails within it while a long healthy transfer goes on.
        """
        timeout_s = timeout_s or self.config.rpc_timeout_s
        started, opened = time.monotonic(), False
        try:
            conn = await self._connection(peer)
            async with rpc.open_stream(conn, method, header, reply_type, chunks, timeout_s) as stream:
                opened = True  # the latency of a stream is its time to the reply header
                self.latency.observe(method, time.monotonic() - started, ok=True)
                yield stream
        finally:
            if not opened:
                self.latency.observe(method, time.monotonic() - started, ok=False)

    async def dial_back(self, addr: PeerAddress) -> None:
        """Dial ``addr`` on a fresh connection, prove its PeerID, close it (AutoNAT, ``autonat.py``)."""
        if not self._running:
            raise TransportError("the transport is not running; call start() first")
        await self._dialer.probe(addr)

    async def accept_circuit(self, relay: PeerAddress, token: bytes) -> None:
        """Open a connection back to ``relay`` that it splices to a waiting dialler (``relay.incoming``): we
        answer the dialler's handshake on it as if we had accepted it (``circuit.py``)."""
        if not self._running:
            raise TransportError("the transport is not running; call start() first")
        family = socket.AF_INET6 if relay.protocol in ("ip6", "dns6") else socket.AF_INET
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                _, conn = await asyncio.get_running_loop().create_connection(
                    self._inbound_protocol, relay.host, relay.port, family=family
                )
        except (OSError, TimeoutError) as e:
            raise TransportError(f"cannot connect back to relay {relay}: {e or 'timed out'}") from None
        conn.relayed = True
        conn.write_record(CircuitRecord(op="accept", token=token).encode())

    def _on_circuit(self, conn: Connection, request: CircuitRecord) -> None:
        if self._circuit_handler is None:
            conn.write_record(encode_refusal("this node offers no relay service", RELAY_UNAVAILABLE))
            conn.close("refused a circuit: no relay service", warn=False)
            return
        self._circuit_handler(conn, request)

    async def ping(self, peer: PeerLike, *, timeout_s: float | None = None) -> float:
        """Round-trip time in seconds of a PING frame to ``peer``."""
        conn = await self._connection(peer)
        return await conn.ping(timeout_s or self.config.rpc_timeout_s)

    # -- connections --

    async def _connection(self, peer: PeerLike) -> Connection:
        if not self._running:
            raise TransportError("the transport is not running; call start() first")
        return await self._dialer.connection(peer)

    def _establish(self, conn: Connection) -> None:
        """A connection finished its handshake and was admitted (dialled or accepted)."""
        self._table.establish(conn, running=self._running)

    def _inbound_protocol(self) -> Connection:
        return Connection(
            config=self.config,
            initiator=False,
            owner=self,
            local_short=self.peer_id.short(),
            scratch=self._scratch,
            traffic=self.traffic,
        )

    def _outbound_protocol(self) -> Connection:
        return Connection(
            config=self.config,
            initiator=True,
            owner=self,
            local_short=self.peer_id.short(),
            scratch=self._scratch,
            traffic=self.traffic,
        )

    def on_connection_made(self, conn: Connection) -> None:
        """Connection callback: start the handshake of an accepted connection, within the pending budget."""
        if conn.initiator:
            return
        if not self._running:
            conn.close("refused: the transport is stopping", warn=False)
            return
        self._listener.accepted(conn)

    def on_connection_warning(self, conn: Connection, reason: str) -> None:
        """Connection callback: a connection closes for a reason worth a warning (rate limited: see connlog)."""
        self._admission.warn_close(conn, reason)

    def on_connection_closed(self, conn: Connection) -> None:
        """Connection callback: forget a closed connection (the reaper or stop() awaits its last tasks)."""
        self._admission.closed(conn)
        self._table.forget(conn)

    def on_request(self, conn: Connection, stream: Stream, frame: Frame) -> None:
        """Connection callback: check a REQUEST frame and start its handler, or answer with an error."""
        dispatch_request(
            conn, stream, frame, handlers=self._handlers, config=self.config, inflight=self._table.inflight
        )

    async def _reap_idle(self) -> None:
        period_s = min(1.0, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self._admission.log.flush_if_due()
            self._table.reap(time.monotonic(), self.config.idle_timeout_s)
