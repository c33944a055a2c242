"""One TCP connection: the Noise handshake, encrypted records, mux frames, streams, drain with a deadline.

The connection is an ``asyncio.BufferedProtocol``: the socket reads into one buffer (80 KiB, grown to 1 MiB while
bulk data flows, see ``trim_read_buffer``), which is split into length-prefixed Noise records and decrypted in
``buffer_updated`` (no per-record coroutine switch; a large frame's records decrypt straight into its payload
buffer), and frames go to their streams synchronously. Writes are synchronous too (encrypted straight into a
reused buffer, see WriteScratch); callers then ``await drain()``, which has the ``write_timeout_s`` deadline, so
frames of concurrent streams never interleave mid-frame.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.config import MAX_NOISE_MESSAGE_BYTES, TransportConfig
from swarm.p2p.framing import (
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    PING_PAYLOAD_BYTES,
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
from swarm.p2p.noise import TAG_LEN, CipherState, HandshakeState, make_payload, verify_payload
from swarm.p2p.refusal import AT_CONNECTION_LIMIT, AT_LIMIT_TEXT, encode_refusal, parse_refusal
from swarm.p2p.streams import Stream
from swarm.errors import (
    HandshakeError,
    OverloadedError,
    PeerIDMismatchError,
    ProtocolError,
    RpcTimeoutError,
    SwarmError,
    TransportError,
)

log = logging.getLogger(__name__)

MAX_PLAINTEXT_BYTES = MAX_NOISE_MESSAGE_BYTES - TAG_LEN
_RECORD_SPACE_BYTES = MAX_NOISE_MESSAGE_BYTES + 2  # one whole length-prefixed record
_SMALL_READ_BUFFER_BYTES = 80 * 1024  # idle and small-RPC connections: one whole record fits
_LARGE_READ_BUFFER_BYTES = 1 << 20  # while bulk data flows: fewer, larger socket reads
_FULL_READS_TO_GROW = 2  # consecutive reads that fill the small buffer before it grows
_MERGED_HEAD_BYTES = 4096  # a frame's first buffer up to this size goes in the frame header's record


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
    ) -> None:
        self.config = config
        self._scratch = scratch
        self.local_short = local_short  # our own short PeerID, for log lines
        self.initiator = initiator
        self.owner = owner
        self.peer_id: PeerID | None = None
        self.remote_host = ""
        self.remote_port = 0
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.last_active_s = time.monotonic()
        self.close_reason = ""
        self._transport: asyncio.Transport | None = None
        self._rbuf = bytearray(_SMALL_READ_BUFFER_BYTES)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._offered_bytes = 0  # size of the view get_buffer handed out last
        self._full_reads = 0  # consecutive reads that filled that view
        self._filled_since_trim = False
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
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._closed = asyncio.get_running_loop().create_future()

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
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote_host, self.remote_port = str(peer[0]), int(peer[1])
        self.owner.on_connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._rbuf) - self._rend < _RECORD_SPACE_BYTES:  # move the partial record to the front
            unread = self._rend - self._rstart
            self._rbuf[:unread] = self._rbuf[self._rstart : self._rend]
            self._rstart, self._rend = 0, unread
        self._offered_bytes = len(self._rbuf) - self._rend
        return self._rview[self._rend :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._refusing is not None:  # refused: drop what the peer still sends until it closes
            self._rstart = self._rend = 0
            return
        self._rend += nbytes
        self._grow_or_count(nbytes == self._offered_bytes)
        if self._recv is not None:
            self._process_records(self._recv)
            return
        # Handshaking: the handshake coroutine takes its messages out; hold the rest (pause when full).
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)
        if self._rend - self._rstart > len(self._rbuf) - _RECORD_SPACE_BYTES and self._transport:
            self._transport.pause_reading()
            self._reading_paused = True

    def _grow_or_count(self, full: bool) -> None:
        """Grow the small read buffer once reads keep filling it (bulk data is flowing)."""
        self._full_reads = self._full_reads + 1 if full else 0
        self._filled_since_trim |= full
        if self._full_reads >= _FULL_READS_TO_GROW and len(self._rbuf) < _LARGE_READ_BUFFER_BYTES:
            self._resize_read_buffer(_LARGE_READ_BUFFER_BYTES)

    def trim_read_buffer(self) -> None:
        """Shrink a large read buffer back if no read filled it since the last call (the transport's reaper
        calls this every period, so a connection that went quiet holds only the small buffer)."""
        unread = self._rend - self._rstart
        if not self._filled_since_trim and len(self._rbuf) > _SMALL_READ_BUFFER_BYTES and unread < _RECORD_SPACE_BYTES:
            self._resize_read_buffer(_SMALL_READ_BUFFER_BYTES)
        self._filled_since_trim = False

    def _resize_read_buffer(self, size_bytes: int) -> None:
        unread = self._rend - self._rstart
        rbuf = bytearray(size_bytes)
        rbuf[:unread] = self._rview[self._rstart : self._rend]
        self._rbuf, self._rview = rbuf, memoryview(rbuf)
        self._rstart, self._rend, self._full_reads = 0, unread, 0

    def _process_records(self, recv: CipherState) -> None:
        """Decrypt and dispatch every complete record in the read buffer."""
        view, pos, end = self._rview, self._rstart, self._rend
        parser, closed = self._parser, self._closed
        try:
            while end - pos >= 2 and not closed.done():  # the hot loop of bulk transfers: kept flat on purpose
                size = (view[pos] << 8) | view[pos + 1]
                if end - pos - 2 < size:
                    break
                record = view[pos + 2 : pos + 2 + size]
                pos += 2 + size
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
        self._rstart = pos

    def eof_received(self) -> bool:
        if self._refusing is not None:
            self.close("refused; the peer closed the connection", warn=False)
        elif self._send is None:  # a dialler's handshake raises the reason (a refusal may be in the buffer)
            self.close("the peer closed the connection during the handshake", warn=not self.initiator)
        elif self._rend > self._rstart or self._parser.mid_frame:
            self.close("the peer closed the connection in the middle of a frame (truncated)", warn=True)
        else:
            self.close("the peer closed the connection", warn=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
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

    async def _read_handshake_message(self) -> bytes:
        """The next length-prefixed record from the read buffer, as the handshake needs it."""
        while True:
            pos, end = self._rstart, self._rend
            if end - pos >= 2:
                size = (self._rbuf[pos] << 8) | self._rbuf[pos + 1]
                if end - pos - 2 >= size:
                    self._rstart = pos + 2 + size
                    return bytes(self._rview[pos + 2 : pos + 2 + size])
            if self._closed.done():
                raise HandshakeError(f"connection closed during the handshake: {self.close_reason}")
            self._handshake_waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._handshake_waiter, self._closed], return_when=asyncio.FIRST_COMPLETED)

    def _write_record(self, message: bytes) -> None:
        if self._transport is not None and not self._closed.done():
            self._transport.write(RECORD_PREFIX.pack(len(message)) + message)

    async def handshake(self, identity: Identity, static_key: X25519PrivateKey, expected: PeerID | None) -> PeerID:
        """Run Noise XX; return the authenticated remote PeerID (the caller bounds this with a timeout)."""
        hs = HandshakeState(initiator=self.initiator, static_key=static_key)
        payload = make_payload(identity, static_key)
        if self.initiator:
            self._write_record(hs.write_message(b""))
            message = await self._read_handshake_message()
            refusal = parse_refusal(message)
            if refusal is not None:
                self._raise_refused(*refusal)
            remote = verify_payload(hs.read_message(message), hs.rs or b"")
            if expected is not None and remote != expected:
                raise PeerIDMismatchError(
                    f"dialled {self.remote_host}:{self.remote_port} expecting peer {expected} but it proved to be "
                    f"{remote}; the address is stale or wrong: update the multiaddr's /p2p/ part"
                )
            self._write_record(hs.write_message(payload))
        else:
            hs.read_message(await self._read_handshake_message())
            self._write_record(hs.write_message(payload))
            self._replied = True
            remote = verify_payload(hs.read_message(await self._read_handshake_message()), hs.rs or b"")
        self.peer_id = remote
        self.last_active_s = time.monotonic()
        self._send, self._recv_ready = hs.split()
        return remote

    def _raise_refused(self, code: str, message: str) -> None:
        where = f"{self.remote_host}:{self.remote_port}"
        if code == AT_CONNECTION_LIMIT:
            raise OverloadedError(
                f"{where} refused the connection: {AT_LIMIT_TEXT} ({message}); retry later or use another peer"
            )
        raise TransportError(f"{where} refused the connection ({code}): {message}")

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
            self._write_record(encode_refusal(message))
        self._rstart = self._rend = 0
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
        views = [memoryview(b).cast("B") for b in (payload if isinstance(payload, tuple) else (payload,))]
        size = sum(v.nbytes for v in views)
        header = FRAME_HEADER.pack(stream_id, ftype, flags, size)
        if size + FRAME_HEADER_BYTES <= MAX_PLAINTEXT_BYTES:
            pieces: list[bytes | memoryview] = [b"".join((header, *views))]
        else:
            pieces = [header]
            if views[0].nbytes <= _MERGED_HEAD_BYTES:  # a small leading buffer (a message head) shares a record
                pieces[0] = header + views.pop(0)
            pieces += [v[i : i + MAX_PLAINTEXT_BYTES] for v in views for i in range(0, v.nbytes, MAX_PLAINTEXT_BYTES)]
        total = sum(len(p) for p in pieces) + len(pieces) * (2 + TAG_LEN)
        out = self._scratch.take(total)
        out_view = memoryview(out)[:total]
        pos = 0
        for piece in pieces:
            n = len(piece) + TAG_LEN
            RECORD_PREFIX.pack_into(out_view, pos, n)
            self._send.encrypt_into(piece, out_view[pos + 2 : pos + 2 + n])
            pos += 2 + n
        self._transport.write(out_view)
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
        if ftype is FrameType.PING or ftype is FrameType.PONG:  # keep-alives: not activity (see docs/transport.md)
            self._on_ping(ftype, frame.payload)
            return
        self.last_active_s = time.monotonic()  # complete frames only: a trickled half frame stays idle
        stream = self.streams.get(frame.stream_id)
        if ftype is FrameType.REQUEST:
            if stream is not None or frame.stream_id % 2 == self._next_stream_id % 2 or frame.stream_id == 0:
                raise ProtocolError(f"REQUEST with a bad or reused stream id {frame.stream_id}")
            stream = Stream(self, frame.stream_id, "?", window_bytes=self.config.stream_window_bytes)
            self.streams[frame.stream_id] = stream
            self.owner.on_request(self, stream, frame)
        elif ftype is FrameType.ERROR and frame.stream_id == 0:
            self._on_connection_error(frame.payload)
        elif stream is None:
            return  # a late frame for a stream that is finished or cancelled here: harmless
        elif ftype is FrameType.REPLY or ftype is FrameType.ERROR:
            reply = stream.reply
            # a second answer is a protocol error; an answer to a call we reset, or whose caller was cancelled
            # (its future is cancelled at once, the stream is dropped a loop turn later), is just late
            if reply is None or (reply.done() and not reply.cancelled() and stream.error is None):
                raise ProtocolError(f"unexpected {ftype.name} on stream {frame.stream_id}")
            if not reply.done():
                reply.set_result((ftype, frame.flags, frame.payload))
        elif ftype is FrameType.DATA:
            stream.on_data(frame.payload)
        elif ftype is FrameType.END:
            stream.on_end()
        elif ftype is FrameType.WINDOW:
            stream.on_window(frame.payload)
        elif ftype is FrameType.RESET:
            reason = bytes(frame.payload[:1000]).decode("utf-8", "replace")
            stream.fail(TransportError(f"{self.peer_short} reset the stream {stream.method}: {reason}"))

    def _on_ping(self, ftype: FrameType, payload: bytes | memoryview) -> None:
        if len(payload) != PING_PAYLOAD_BYTES:
            raise ProtocolError(f"{ftype.name} frame of {len(payload)} bytes; expected {PING_PAYLOAD_BYTES}")
        if ftype is FrameType.PING:
            self.send_frame(0, FrameType.PONG, 0, payload)
            return
        waiter = self._pings.pop(bytes(payload), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        token = os.urandom(PING_PAYLOAD_BYTES)
        waiter = asyncio.get_running_loop().create_future()
        self._pings[token] = waiter
        start = time.perf_counter()
        try:
            self.send_frame(0, FrameType.PING, 0, token)
            async with asyncio.timeout(timeout_s):
                await asyncio.wait([waiter, self._closed], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise RpcTimeoutError(f"{self.peer_short} did not answer a ping within {timeout_s:.1f}s") from None
        finally:
            self._pings.pop(token, None)
        if not waiter.done():
            raise TransportError(f"connection to {self.peer_short} closed during a ping: {self.close_reason}")
        return time.perf_counter() - start

    # -- closing --

    def close(self, reason: str, *, warn: bool) -> None:
        """Close the connection (idempotent): fail its streams (which cancels their handlers), tell the owner."""
        if self._closed.done():
            return
        self.close_reason = reason
        self._closed.set_result(None)
        if self._refusing is not None:
            self._refusing.cancel()
        if warn:  # rate limited by the owner: anyone can open connections that fail
            self.owner.on_connection_warning(self, reason)
        else:
            log.debug("%s: closing connection to %s: %s", self.local_short, self.peer_short, reason)
        if self._transport is not None:
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
