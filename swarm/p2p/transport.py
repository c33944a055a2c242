"""Transport: listens, dials (one reused connection per peer), dispatches requests to registered handlers."""

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
from swarm.p2p.maddr import PeerAddress, format_maddr, parse_maddr
from swarm.p2p.messages import Message
from swarm.p2p import rpc
from swarm.p2p.admission import Admission
from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.framing import FLAG_CHUNKS, Chunk, ErrorCode, Frame, WriteScratch, decode_request
from swarm.p2p.rpc import HandlerEntry, StreamHandler, StreamReply, UnaryHandler
from swarm.p2p.streams import Stream
from swarm.errors import ConfigError, HandshakeError, OverloadedError, ProtocolError, SwarmError, TransportError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
PeerLike = PeerID | PeerAddress | str
PeerCallback = Callable[[PeerID, PeerAddress], None]


class Transport:
    """The encrypted, multiplexed RPC transport of one node (see docs/transport.md)."""

    def __init__(self, identity: Identity, config: TransportConfig) -> None:
        self.identity = identity
        self.config = config
        self._static_key = X25519PrivateKey.generate()
        self._scratch = WriteScratch()
        self._handlers: dict[str, HandlerEntry] = {}
        self._addresses: dict[PeerID, list[PeerAddress]] = {}
        self._conns: dict[PeerID, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._admission = Admission(config, log, identity.peer_id.short())  # the connection budgets
        self._dials: dict[Any, asyncio.Task[Connection]] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._listen_maddrs: tuple[str, ...] = ()
        self._reaper: asyncio.Task[None] | None = None
        self._on_connected: list[PeerCallback] = []
        self._on_disconnected: list[PeerCallback] = []
        self._running = False

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def listen_maddrs(self) -> tuple[str, ...]:
        """The multiaddrs we listen on, with the real ports and ``/p2p/<PeerID>``."""
        return self._listen_maddrs

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on every ``listen_maddrs`` entry and start the idle-connection reaper."""
        loop = asyncio.get_running_loop()
        self._running = True
        maddrs = []
        try:
            for text in self.config.listen_maddrs:
                addr = parse_maddr(text)
                family = socket.AF_INET6 if addr.protocol in ("ip6", "dns6") else socket.AF_INET
                try:
                    server = await loop.create_server(self._inbound_protocol, addr.host, addr.port, family=family)
                except OSError as e:
                    raise ConfigError(
                        f"listen_maddrs: cannot listen on {text}: {e.strerror}; pick another port"
                    ) from None
                self._servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    maddrs.append(format_maddr(str(host), int(port), self.peer_id))
        except BaseException:
            await self.stop()
            raise
        self._listen_maddrs = tuple(maddrs)
        self._reaper = loop.create_task(self._reap_idle())
        log.debug("transport %s listening on %s", self.peer_id.short(), maddrs)

    async def stop(self) -> None:
        """Close listeners and connections, cancel every task this transport owns, and wait for them."""
        self._running = False
        for server in self._servers:
            server.close()
        tasks: list[asyncio.Task[Any]] = [*self._handshakes, *self._dials.values()]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        self._admission.close_all()
        for conn in list(self._all):
            conn.close("the transport is stopping", warn=False)
            tasks.extend(conn.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.write_timeout_s)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.write_timeout_s):
                    await server.wait_closed()
        self._servers.clear()
        self._all.clear()
        self._conns.clear()
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
        known = self._addresses.setdefault(peer_id, [])
        for addr in addrs:
            addr = addr.with_peer_id(peer_id)
            if addr in known:
                known.remove(addr)
            known.insert(0, addr)
        del known[16:]

    def addresses(self, peer_id: PeerID) -> tuple[PeerAddress, ...]:
        return tuple(self._addresses.get(peer_id, ()))

    def on_peer_connected(self, callback: PeerCallback) -> None:
        """Call ``callback(peer_id, remote_address)`` when a peer gets its first open connection."""
        self._on_connected.append(callback)

    def on_peer_disconnected(self, callback: PeerCallback) -> None:
        """Call ``callback(peer_id, remote_address)`` when a peer's last connection closes."""
        self._on_disconnected.append(callback)

    def connected_peers(self) -> list[PeerID]:
        return [peer for peer, conns in self._conns.items() if any(c.is_open for c in conns)]

    async def disconnect(self, peer_id: PeerID) -> None:
        """Close every connection to ``peer_id`` (in-flight requests fail with TransportError)."""
        for conn in list(self._conns.get(peer_id, ())):
            conn.close("disconnected on request", warn=False)

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
        conn = await self._connection(peer)  # bounded by connect_timeout_s + handshake_timeout_s
        return await rpc.call(conn, method, request, reply_type, timeout_s)

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
        conn = await self._connection(peer)
        async with rpc.open_stream(conn, method, header, reply_type, chunks, timeout_s) as stream:
            yield stream

    async def ping(self, peer: PeerLike, *, timeout_s: float | None = None) -> float:
        """Round-trip time in seconds of a PING frame to ``peer``."""
        conn = await self._connection(peer)
        return await conn.ping(timeout_s or self.config.rpc_timeout_s)

    # -- connections --

    def _open_connection(self, peer_id: PeerID) -> Connection | None:
        for conn in self._conns.get(peer_id, ()):
            if conn.is_open:
                return conn
        return None

    async def _connection(self, peer: PeerLike) -> Connection:
        if not self._running:
            raise TransportError("the transport is not running; call start() first")
        if isinstance(peer, str):
            peer = parse_maddr(peer)
        peer_id: PeerID | None
        addrs: tuple[PeerAddress, ...]
        if isinstance(peer, PeerID):
            peer_id, addrs = peer, self.addresses(peer)
            if not addrs and self._open_connection(peer) is None:
                raise TransportError(f"no known address for peer {peer.short()}; add one with add_addresses()")
        else:
            peer_id, addrs = peer.peer_id, (peer,)
        if peer_id is not None and (conn := self._open_connection(peer_id)) is not None:
            return conn
        key: Any = peer_id if peer_id is not None else (addrs[0].host, addrs[0].port)
        task = self._dials.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial_any(peer_id, addrs))
            self._dials[key] = task
            task.add_done_callback(lambda t: self._dial_done(key, t))
        return await asyncio.shield(task)

    def _dial_done(self, key: Any, task: asyncio.Task[Connection]) -> None:
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it

    async def _dial_any(self, peer_id: PeerID | None, addrs: Iterable[PeerAddress]) -> Connection:
        errors: list[SwarmError] = []
        for addr in addrs:
            try:
                return await self._dial(addr)
            except (TransportError, HandshakeError) as e:
                errors.append(e)
        if len(errors) == 1 or all(isinstance(e, OverloadedError) for e in errors):
            raise errors[0]
        who = peer_id.short() if peer_id is not None else "the peer"
        raise TransportError(f"cannot reach {who} at any known address: " + "; ".join(map(str, errors)))

    async def _dial(self, addr: PeerAddress) -> Connection:
        with self._admission.dial_slot():  # OverloadedError if every slot is taken and busy
            conn = await self._dial_and_handshake(addr)
            self._admission.dialled(conn)
        self.add_addresses(conn.peer_id, [addr])  # type: ignore[arg-type]  # the handshake set it
        self._add_connection(conn)
        conn.begin_frames()
        return conn

    async def _dial_and_handshake(self, addr: PeerAddress) -> Connection:
        family = socket.AF_INET6 if addr.protocol in ("ip6", "dns6") else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                _, conn = await loop.create_connection(self._outbound_protocol, addr.host, addr.port, family=family)
        except (OSError, TimeoutError) as e:
            reason = e or "timed out"
            raise TransportError(f"cannot connect to {addr}: {reason}; check that the peer runs there") from None
        self._all.add(conn)
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                peer_id = await conn.handshake(self.identity, self._static_key, addr.peer_id)
        except TimeoutError:
            conn.close("handshake timed out", warn=True)
            raise HandshakeError(
                f"handshake with {addr} did not finish within {self.config.handshake_timeout_s}s; is it a swarm node?"
            ) from None
        except SwarmError as e:  # a refusal is the peer's honest answer, not a fault: no warning
            conn.close(f"handshake failed: {e}", warn=not isinstance(e, OverloadedError))
            raise
        if peer_id == self.peer_id:
            conn.close("dialled ourselves", warn=False)
            raise TransportError(f"{addr} is this node itself; leave it out of the peers to dial")
        if conn.closed:
            raise TransportError(f"connection to {addr} closed right after the handshake: {conn.close_reason}")
        return conn

    def _inbound_protocol(self) -> Connection:
        return Connection(
            config=self.config, initiator=False, owner=self, local_short=self.peer_id.short(), scratch=self._scratch
        )

    def _outbound_protocol(self) -> Connection:
        return Connection(
            config=self.config, initiator=True, owner=self, local_short=self.peer_id.short(), scratch=self._scratch
        )

    def on_connection_made(self, conn: Connection) -> None:
        """Connection callback: start the handshake of an accepted connection, within the pending budget."""
        if conn.initiator:
            return
        if not self._running:
            conn.close("refused: the transport is stopping", warn=False)
            return
        if not self._admission.accept(conn):
            return
        self._all.add(conn)
        task = asyncio.get_running_loop().create_task(self._accept(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _accept(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                await conn.handshake(self.identity, self._static_key, None)
        except TimeoutError:
            conn.close(
                f"handshake not finished within handshake_timeout_s={self.config.handshake_timeout_s}s", warn=True
            )
            return
        except SwarmError as e:
            conn.close(f"handshake failed: {e}", warn=True)
            return
        if not self._admission.establish(conn):
            return
        self._add_connection(conn)
        conn.begin_frames()

    def on_connection_warning(self, conn: Connection, reason: str) -> None:
        """Connection callback: a connection closes for a reason worth a warning (rate limited: see connlog)."""
        self._admission.warn_close(conn, reason)

    def _add_connection(self, conn: Connection) -> None:
        peer_id = conn.peer_id
        if peer_id is None or not conn.is_open:
            return
        if peer_id == self.peer_id:  # the accepting side of a dial to ourselves
            conn.close("a connection from ourselves", warn=False)
            return
        if not self._running:
            conn.close("the transport is stopping", warn=False)
            return
        conns = self._conns.setdefault(peer_id, [])
        first = not any(c.is_open for c in conns)
        conns.append(conn)
        log.debug(
            "%s: %s connection with %s (%s:%d)",
            self.peer_id.short(),
            "outbound" if conn.initiator else "inbound",
            peer_id.short(),
            conn.remote_host,
            conn.remote_port,
        )
        if first:
            self._notify(self._on_connected, conn)

    def on_connection_closed(self, conn: Connection) -> None:
        """Connection callback: forget a closed connection (the reaper or stop() awaits its last tasks)."""
        self._admission.closed(conn)
        if not conn.tasks:
            self._all.discard(conn)
        if conn.peer_id is None or conn not in self._conns.get(conn.peer_id, ()):
            return
        conns = self._conns[conn.peer_id]
        conns.remove(conn)
        if not conns:
            del self._conns[conn.peer_id]
            self._notify(self._on_disconnected, conn)

    def _notify(self, callbacks: list[PeerCallback], conn: Connection) -> None:
        peer_id = conn.peer_id
        if peer_id is None:
            return
        addr = PeerAddress(
            host=conn.remote_host or "0.0.0.0",
            port=conn.remote_port,
            peer_id=peer_id,
            protocol="ip6" if ":" in conn.remote_host else "ip4",
        )
        for callback in callbacks:
            try:
                callback(peer_id, addr)
            except Exception:
                log.exception("%s: peer callback %r failed for %s", self.peer_id.short(), callback, peer_id.short())

    def on_request(self, conn: Connection, stream: Stream, frame: Frame) -> None:
        """Connection callback: check a REQUEST frame and start its handler, or answer with an error."""
        try:
            head = decode_request(frame.payload, max_size_bytes=self.config.max_message_size_bytes)
        except ProtocolError as e:
            log.warning("%s: malformed request from %s: %s", self.peer_id.short(), conn.peer_short, e)
            rpc.reject(conn, stream, ErrorCode.BAD_REQUEST, str(e))
            return
        stream.method = head.method
        entry = self._handlers.get(head.method)
        with_chunks = bool(frame.flags & FLAG_CHUNKS)
        if entry is None:
            log.warning(
                "%s: request for unknown method %r from %s", self.peer_id.short(), head.method[:100], conn.peer_short
            )
            rpc.reject(conn, stream, ErrorCode.UNKNOWN_METHOD, f"this peer serves no method {head.method[:100]!r}")
        elif with_chunks and not entry.streaming:
            log.warning("%s: chunks sent to unary method %s by %s", self.peer_id.short(), head.method, conn.peer_short)
            rpc.reject(conn, stream, ErrorCode.BAD_REQUEST, f"{head.method} is unary; call it without chunks")
        elif (inflight := self._inflight(conn)) >= self.config.max_inflight_requests_per_peer:
            log.warning("%s: overloaded: %s has %d requests in flight", self.peer_id.short(), conn.peer_short, inflight)
            rpc.reject(
                conn,
                stream,
                ErrorCode.OVERLOADED,
                f"{inflight} requests in flight from you (max_inflight_requests_per_peer)",
            )
        else:
            stream.expects_chunks = with_chunks
            if with_chunks:
                stream.announce_window()
            stream.handler_task = conn.spawn(rpc.serve_request(conn, stream, entry, head))

    def _inflight(self, conn: Connection) -> int:
        """Requests being served for ``conn``'s peer, over all its connections."""
        conns = self._conns.get(conn.peer_id, ()) if conn.peer_id is not None else ()
        return sum(len(c.tasks) for c in conns) if conn in conns else len(conn.tasks)

    async def _reap_idle(self) -> None:
        period_s = min(1.0, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self._admission.log.flush_if_due()
            now = time.monotonic()
            for conn in list(self._all):
                if conn.closed and not conn.tasks:
                    self._all.discard(conn)
                elif conn.is_open and not conn.streams and now - conn.last_active_s > self.config.idle_timeout_s:
                    conn.close(f"idle for over idle_timeout_s={self.config.idle_timeout_s}s", warn=False)
                elif conn.is_open:
                    conn.trim_read_buffer()
