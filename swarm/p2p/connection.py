"""One TCP connection: the asyncio protocol that ties handshake, read buffer, records, frames and streams together.

The connection is an ``asyncio.BufferedProtocol``: the socket reads into its ReadBuffer (``readbuffer.py``: 80 KiB,
grown to 1 MiB while bulk data flows), which is split into length-prefixed Noise records and decrypted in
``buffer_updated`` (no per-record coroutine switch; a large frame's records decrypt straight into its payload
buffer), and frames go to their streams synchronously (``demux.py``). Writes are synchronous too (``sealing.py``
encrypts straight into a reused buffer, see WriteScratch); callers then ``await drain()``, which has the
``write_timeout_s`` deadline, so frames of concurrent streams never interleave mid-frame. The Noise XX handshake
is in ``handshake.py``, keep-alive PINGs in ``keepalive.py``.

A graceful close (``close(..., linger_s=...)``: the transport stopping, a disconnect on request) lingers: the
streams fail at once, but the socket half-closes behind the bytes still buffered and stays open, dropping what the
peer still sends, until the peer has read everything and closed its end (its EOF) or ``linger_s`` passes; only
then is it closed (or aborted). Closing at once would cut the tail of what we wrote, and closing a socket with
unread input would reset it. Every other close (a protocol error, a bad peer, a failed handshake) is immediate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.config import TransportConfig
from swarm.p2p.delay import DelayedTransport
from swarm.p2p.demux import deliver
from swarm.p2p.framing import (
    RECORD_PREFIX,
    Chunk,
    ErrorCode,
    Frame,
    FrameParser,
    FrameType,
    WriteScratch,
    decode_error,
    encode_error,
)
from swarm.p2p.handshake import noise_xx
from swarm.p2p.keepalive import Pinger
from swarm.p2p.noise import TAG_LEN, CipherState
from swarm.p2p.readbuffer import ReadBuffer
from swarm.p2p.refusal import AT_LIMIT_TEXT, encode_refusal
from swarm.p2p.sealing import seal_frame
from swarm.p2p.streams import Stream
from swarm.p2p.traffic import OTHER_FAMILY, P2P_FAMILY, Traffic
from swarm.errors import HandshakeError, OverloadedError, ProtocolError, SwarmError, TransportError

log = logging.getLogger(__name__)


class ConnectionOwner(Protocol):
    """What a connection needs from the transport that owns it."""

    def on_connection_made(self, conn: Connection) -> None: ...

    def on_request(self, conn: Connection, stream: Stream, frame: Frame) -> None: ...

    def on_connection_closed(self, conn: Connection) -> None: ...

    def on_connection_warning(self, conn: Connection, reason: str) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """An authenticated, encrypted, multiplexed connection to one peer."""

    def __init__(
        self,
        *,
        config: TransportConfig,
        initiator: bool,
        owner: ConnectionOwner,
        local_short: str,
        scratch: WriteScratch,
        traffic: Traffic,
    ) -> None:
        self.config = config
        self.traffic = traffic
        self._rx_pending_bytes = 0  # record bytes received since the last complete frame (see traffic.py)
        self._scratch = scratch
        self.local_short = local_short  # our own short PeerID, for log lines
        self.initiator = initiator
        self.owner = owner
        self.peer_id: PeerID | None = None
        self.remote_host = ""
        self.remote_port = 0
        self.relayed = False  # runs through a relay's circuit: remote_host/port are the relay's
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.last_active_s = time.monotonic()
        self.close_reason = ""
        self._transport: asyncio.Transport | None = None
        self.read_buffer = ReadBuffer()
        self._reading_paused = False
        self._handshake_waiter: asyncio.Future[None] | None = None
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._recv_ready: CipherState | None = None  # set by the handshake, used once begin_frames() admits us
        self._refusing: asyncio.TimerHandle | None = None  # the linger timer of a refusal
        self._replied = False  # as the responder: handshake message 2 is sent
        self._close_error: type[TransportError] = TransportError
        self._parser = FrameParser(config.max_frame_size_bytes, self._on_frame)
        self._next_stream_id = 1 if initiator else 2
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pinger = Pinger(lambda ftype, payload: self.send_frame(0, ftype, 0, payload))
        self._closed = asyncio.get_running_loop().create_future()
        self._lingering = False  # closed gracefully: the socket stays open until the peer has read our bytes
        self._peer_eof = asyncio.get_running_loop().create_future()  # set once lingering and the peer closed
        self._lost = asyncio.get_running_loop().create_future()  # connection_lost ran: the socket is closed

    @property
    def peer_short(self) -> str:
        return self.peer_id.short() if self.peer_id is not None else f"{self.remote_host}:{self.remote_port}"

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def is_open(self) -> bool:
        return not self._closed.done() and self._send is not None and self._refusing is None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # a TCP transport, as create_server/create_connection give
        self._transport = tcp
        tcp.set_write_buffer_limits(high=self.config.write_buffer_high_bytes)
        if self.config.emulated_delay_s > 0:  # tests and benchmarks of latency hiding only
            self._transport = cast(asyncio.Transport, DelayedTransport(tcp, self.config.emulated_delay_s))
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote_host, self.remote_port = str(peer[0]), int(peer[1])
        self.owner.on_connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer.offer()

    def buffer_updated(self, nbytes: int) -> None:
        rb = self.read_buffer
        if self._refusing is not None or self._lingering:  # refused or closing: drop what the peer still sends
            rb.discard()
            return
        rb.filled(nbytes)
        if self._recv is not None:
            self._process_records(self._recv)
            return
        # Handshaking: the handshake coroutine takes its messages out; hold the rest (pause when full).
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)
        if rb.nearly_full and self._transport:
            self._transport.pause_reading()
            self._reading_paused = True

    def trim_read_buffer(self) -> None:
        """Shrink a large read buffer back if no read filled it since the last call (see ReadBuffer.trim)."""
        self.read_buffer.trim()

    def _process_records(self, recv: CipherState) -> None:
        """Decrypt and dispatch every complete record in the read buffer."""
        rb = self.read_buffer
        view, pos, end = rb.view, rb.start, rb.end
        parser, closed = self._parser, self._closed
        try:
            while end - pos >= 2 and not closed.done():  # the hot loop of bulk transfers: kept flat on purpose
                size = (view[pos] << 8) | view[pos + 1]
                if end - pos - 2 < size:
                    break
                record = view[pos + 2 : pos + 2 + size]
                pos += 2 + size
                self._rx_pending_bytes += 2 + size
                plain = size - TAG_LEN
                if plain < 0:
                    raise ProtocolError("a Noise record shorter than its tag; closing the connection")
                target = parser.direct_target(plain)  # inside a large frame's payload: decrypt straight into it
                if target is not None:
                    recv.decrypt_into(record, target)
                    parser.advance(plain)
                else:
                    parser.feed(recv.decrypt_with_ad(b"", record))
        except SwarmError as e:
            self.close(f"{e}", warn=True)
        rb.start = pos

    def eof_received(self) -> bool:
        if self._lingering:  # the peer read what we wrote and closed: the linger closes the socket (after a delay)
            if not self._peer_eof.done():
                self._peer_eof.set_result(None)
            return True
        if self._refusing is not None:
            self.close("refused; the peer closed the connection", warn=False)
        elif self._send is None:  # a dialler's handshake raises the reason (a refusal may be in the buffer)
            self.close("the peer closed the connection during the handshake", warn=not self.initiator)
        elif self.read_buffer.unread_bytes > 0 or self._parser.mid_frame:
            self.close("the peer closed the connection in the middle of a frame (truncated)", warn=True)
        else:
            self.close("the peer closed the connection", warn=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        self.close(f"connection lost ({exc})" if exc else "connection closed", warn=False)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- handshake --

    async def read_handshake_record(self) -> bytes:
        """The next length-prefixed record from the read buffer, as the handshake needs it."""
        while True:
            record = self.read_buffer.take_record()
            if record is not None:
                self.traffic.received(P2P_FAMILY, 2 + len(record))
                return record
            if self._closed.done():
                raise HandshakeError(f"connection closed during the handshake: {self.close_reason}")
            self._handshake_waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._handshake_waiter, self._closed], return_when=asyncio.FIRST_COMPLETED)

    def write_record(self, message: bytes) -> None:
        if self._transport is not None and not self._closed.done():
            self._transport.write(RECORD_PREFIX.pack(len(message)) + message)
            self.traffic.sent(P2P_FAMILY, 2 + len(message))

    def replied(self) -> None:
        """As the responder: handshake message 2 is sent."""
        self._replied = True

    async def handshake(self, identity: Identity, static_key: X25519PrivateKey, expected: PeerID | None) -> PeerID:
        """Run Noise XX; return the authenticated remote PeerID (the caller bounds this with a timeout)."""
        where = f"{self.remote_host}:{self.remote_port}"
        remote, send, recv = await noise_xx(
            self, initiator=self.initiator, where=where, identity=identity, static_key=static_key, expected=expected
        )
        self.peer_id = remote
        self.last_active_s = time.monotonic()
        self._send, self._recv_ready = send, recv
        return remote

    def begin_frames(self) -> None:
        """The transport admitted this connection after its handshake: read frames (those that came right after
        handshake message 3 were held until now)."""
        if self._recv_ready is None or self._closed.done():
            return
        self._recv, self._recv_ready = self._recv_ready, None
        self._process_records(self._recv)
        if self._reading_paused and self._transport is not None and not self._closed.done():
            self._reading_paused = False
            self._transport.resume_reading()

    def refuse(self, message: str, linger_s: float) -> bool:
        """Tell the peer that we are at our connection limit, then close. Before the handshake the refusal
        record takes the place of message 2; after it, an ERROR frame on stream 0 (code ``overloaded``). We
        half-close and drop the peer's input until it closes or ``linger_s`` passes: closing a socket with
        unread input would reset it and could destroy the refusal before the peer reads it. False (nothing
        sent) if the connection is closed or between handshake messages 2 and 3, where no refusal fits."""
        if self._closed.done() or self._refusing is not None or self._transport is None:
            return False
        if self._send is None and self._replied:
            return False
        if self._send is not None:
            self.send_frame(0, FrameType.ERROR, 0, encode_error(ErrorCode.OVERLOADED, message))
        else:
            self.write_record(encode_refusal(message))
        self.read_buffer.discard()
        self._refusing = asyncio.get_running_loop().call_later(
            linger_s, lambda: self.close(f"refused: {message}", warn=False)
        )
        try:
            if self._transport.can_write_eof():
                self._transport.write_eof()
        except OSError:  # the peer is gone already
            self.close(f"refused: {message}", warn=False)
            return False
        return True

    # -- writing --

    def send_frame(self, stream_id: int, ftype: FrameType, flags: int, payload: Chunk) -> None:
        """Encrypt one frame into records and hand it to the socket (a no-op once the connection is closed).

        A tuple payload is sent as the concatenation of its buffers, each encrypted straight from its memory.
        """
        if self._closed.done() or self._transport is None or self._send is None:
            return
        out, out_view = seal_frame(self._send, self._scratch, stream_id, ftype, flags, payload)
        self._transport.write(out_view)
        stream = self.streams.get(stream_id) if stream_id else None
        self.traffic.sent(stream.method if stream else P2P_FAMILY if not stream_id else OTHER_FAMILY, len(out_view))
        if self._transport.get_write_buffer_size() == 0:  # the socket took it all: nothing refers to `out`
            self._scratch.give_back(out)
        if ftype is not FrameType.PING and ftype is not FrameType.PONG:
            self.last_active_s = time.monotonic()

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its limit; close the connection after write_timeout_s."""
        if self._closed.done():
            raise self._close_error(f"connection to {self.peer_short} is closed: {self.close_reason}")
        if not self._paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                await waiter
        except TimeoutError:
            self.close(f"the peer stopped reading for write_timeout_s={self.config.write_timeout_s}s", warn=True)
        if self._closed.done():
            raise self._close_error(f"connection to {self.peer_short} is closed: {self.close_reason}")

    # -- frames --

    def _on_frame(self, frame: Frame) -> None:
        if (
            self._paused
            and self._transport is not None
            and self._transport.get_write_buffer_size()
            > (2 * self.config.write_buffer_high_bytes + self.config.max_frame_size_bytes)
        ):
            raise ProtocolError("the peer keeps sending but does not read our answers")
        ftype = frame.type
        size_bytes, self._rx_pending_bytes = self._rx_pending_bytes, 0
        if ftype is FrameType.PING or ftype is FrameType.PONG:  # keep-alives: not activity (see docs/transport.md)
            self.traffic.received(P2P_FAMILY, size_bytes)
            self._pinger.on_frame(ftype, frame.payload)
            return
        self.last_active_s = time.monotonic()  # complete frames only: a trickled half frame stays idle
        if ftype is FrameType.ERROR and frame.stream_id == 0:
            self.traffic.received(P2P_FAMILY, size_bytes)
            self._on_connection_error(frame.payload)
        else:
            deliver(self, frame)  # a REQUEST gets its stream, and its method, here
            stream = self.streams.get(frame.stream_id)
            self.traffic.received(stream.method if stream else OTHER_FAMILY, size_bytes)

    def _on_connection_error(self, payload: bytes | memoryview) -> None:
        """An ERROR frame on stream 0: the peer closes the whole connection, e.g. it is at its connection limit."""
        code, message = decode_error(bytes(payload))
        if code == ErrorCode.OVERLOADED.value:
            self._close_error = OverloadedError
            self.close(f"{AT_LIMIT_TEXT} ({message[:400]}); retry later or use another peer", warn=False)
        else:
            self.close(f"the peer closed the connection with an error ({code[:100]}): {message[:400]}", warn=False)

    # -- client helpers --

    def open_stream(self, method: str) -> Stream:
        """A new outgoing stream with its reply future registered."""
        if not self.is_open:
            raise self._close_error(f"connection to {self.peer_short} is closed: {self.close_reason}; retry to redial")
        stream_id = self._next_stream_id
        if stream_id >= 2**32 - 2:
            self.close("stream ids exhausted", warn=False)
            raise TransportError(f"connection to {self.peer_short} ran out of stream ids; retry to redial")
        self._next_stream_id += 2
        stream = Stream(self, stream_id, method, window_bytes=self.config.stream_window_bytes)
        stream.reply = asyncio.get_running_loop().create_future()
        self.streams[stream_id] = stream
        return stream

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a handler task owned by this connection (cancelled when it closes)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)

    async def ping(self, timeout_s: float) -> float:
        """Round-trip time of a PING frame, in seconds."""
        rtt_s = await self._pinger.round_trip(timeout_s, self._closed, self.peer_short)
        if rtt_s is None:
            raise TransportError(f"connection to {self.peer_short} closed during a ping: {self.close_reason}")
        return rtt_s

    # -- closing --

    def detach(self, reason: str) -> tuple[asyncio.Transport | None, bytes]:
        """Hand the socket and its unread bytes over (a relay splices it into a circuit, ``relay.py``): the
        connection closes, the socket stays open."""
        transport, self._transport = self._transport, None
        rest = bytes(self.read_buffer.view[self.read_buffer.start : self.read_buffer.end])
        self.read_buffer.discard()
        self.close(reason, warn=False)
        return transport, rest

    def close(self, reason: str, *, warn: bool, linger_s: float = 0.0) -> None:
        """Close the connection (idempotent): fail its streams (which cancels their handlers), tell the owner.

        ``linger_s`` > 0 (a graceful close; not with ``warn``): the socket lingers, an owned task in ``tasks``,
        until the peer has read what we wrote and closed its end, at most ``linger_s`` (see the module's doc).
        """
        if self._closed.done():
            return
        transport = self._transport
        if transport is not None and linger_s > 0 and not warn and self._send is not None:
            self._lingering = True
            self.read_buffer.discard()
            self.spawn(self._linger(transport, linger_s))
        self.close_reason = reason
        self._closed.set_result(None)
        if self._refusing is not None:
            self._refusing.cancel()
        if warn:  # rate limited by the owner: anyone can open connections that fail
            self.owner.on_connection_warning(self, reason)
        else:
            log.debug("%s: closing connection to %s: %s", self.local_short, self.peer_short, reason)
        if self._transport is not None and not self._lingering:
            if self._transport.get_write_buffer_size() == 0 and not warn:
                self._transport.close()
            else:
                self._transport.abort()
        error = self._close_error(f"connection to {self.peer_short} closed: {reason}; retry to redial")
        for stream in list(self.streams.values()):
            stream.fail(error)
        self.streams.clear()
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)
        self.owner.on_connection_closed(self)

    async def _linger(self, transport: asyncio.Transport, linger_s: float) -> None:
        """Half-close behind the buffered bytes; close once the peer closed its end, abort after ``linger_s``."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(linger_s):
                transport.resume_reading()  # what comes in is dropped, but the peer's EOF must be seen
                if transport.can_write_eof():
                    transport.write_eof()  # our FIN follows the bytes still buffered
                await asyncio.wait([self._peer_eof, self._lost], return_when=asyncio.FIRST_COMPLETED)
                transport.close()  # nothing left to send (the peer read up to our FIN): a plain close
                await self._lost
        except TimeoutError:
            log.debug(
                "%s: %s did not read what we wrote within close_linger_s=%.1fs; aborting the connection",
                self.local_short,
                self.peer_short,
                linger_s,
            )
        except OSError as e:  # the peer is gone already
            log.debug("%s: closing the connection to %s: %s", self.local_short, self.peer_short, e)
        finally:
            if not self._lost.done():
                transport.abort()
        log.debug(
            "%s: connection to %s closed after %.3fs", self.local_short, self.peer_short, time.monotonic() - started
        )
