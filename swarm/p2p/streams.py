"""One request on a connection: its reply, its byte chunks in both directions, and their credit flow control.

Each direction of a stream starts with ``INITIAL_STREAM_WINDOW_BYTES`` of credit; the receiver announces the rest
of its ``stream_window_bytes`` with a WINDOW frame and grants more as the application consumes chunks. A sender
may send a chunk while its credit is positive, so a receiver buffers at most one window plus one frame per
stream, and a slow stream never blocks the others on the same connection.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from swarm.p2p.config import INITIAL_STREAM_WINDOW_BYTES
from swarm.p2p.framing import WINDOW_PAYLOAD, Chunk, FrameType
from swarm.errors import ProtocolError, RpcTimeoutError, TransportError

if TYPE_CHECKING:
    from swarm.p2p.connection import Connection

_END = object()


class Stream:
    """The per-stream state of a Connection (both the calling and the serving side use it)."""

    __slots__ = (
        "_allowance",
        "_consumed",
        "_credit",
        "_credit_waiter",
        "_queue",
        "_waiter",
        "_window",
        "conn",
        "error",
        "expects_chunks",
        "handler_task",
        "id",
        "local_ended",
        "method",
        "remote_ended",
        "reply",
    )

    def __init__(self, conn: Connection, stream_id: int, method: str, *, window_bytes: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.method = method
        self.reply: asyncio.Future[tuple[FrameType, int, bytes | memoryview]] | None = None
        self.handler_task: asyncio.Task[None] | None = None
        self._queue: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._allowance = INITIAL_STREAM_WINDOW_BYTES  # what the peer may still send us
        self._consumed = 0
        self._window = window_bytes
        self._credit = INITIAL_STREAM_WINDOW_BYTES  # what we may still send the peer
        self._credit_waiter: asyncio.Future[None] | None = None
        self.remote_ended = False
        self.local_ended = False
        self.error: BaseException | None = None
        self.expects_chunks = False

    # -- frames from the peer (called synchronously by the connection) --

    def announce_window(self) -> None:
        """Tell the peer our full receive window (it starts at INITIAL_STREAM_WINDOW_BYTES)."""
        extra = self._window - INITIAL_STREAM_WINDOW_BYTES
        if extra > 0:
            self._allowance += extra
            self.conn.send_frame(self.id, FrameType.WINDOW, 0, WINDOW_PAYLOAD.pack(extra))

    def on_data(self, payload: bytes | memoryview) -> None:
        if self.remote_ended or not self.expects_chunks:
            raise ProtocolError(f"DATA on stream {self.id} ({self.method}) that has no open chunk direction")
        if self._allowance <= 0:
            raise ProtocolError(f"peer sent DATA on stream {self.id} ({self.method}) beyond the window it was granted")
        self._allowance -= len(payload)
        self._push(payload)

    def on_end(self) -> None:
        if self.remote_ended or not self.expects_chunks:
            raise ProtocolError(f"END on stream {self.id} ({self.method}) that has no open chunk direction")
        self.remote_ended = True
        self._push(_END)

    def on_window(self, payload: bytes | memoryview) -> None:
        if len(payload) != WINDOW_PAYLOAD.size:
            raise ProtocolError(f"WINDOW frame of {len(payload)} bytes; expected {WINDOW_PAYLOAD.size}")
        self._credit += WINDOW_PAYLOAD.unpack(payload)[0]
        if self._credit > 0 and self._credit_waiter is not None and not self._credit_waiter.done():
            self._credit_waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Abort the stream (reset by the peer, or the connection closed): every waiter gets ``error``."""
        if self.error is not None:
            return
        self.error = error
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(error)
            self.reply.exception()  # retrieved here so an unawaited reply logs nothing
        self._push(error)
        if self._credit_waiter is not None and not self._credit_waiter.done():
            self._credit_waiter.set_result(None)
        if self.handler_task is not None:
            self.handler_task.cancel()

    def _push(self, item: Any) -> None:
        self._queue.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the application side --

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        """The next chunk from the peer, or None after its END; RpcTimeoutError if none comes in time."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            except TimeoutError:
                raise RpcTimeoutError(
                    f"no chunk from {self.conn.peer_short} on {self.method} for {timeout_s:.1f}s; "
                    "the peer is slow or gone: retry or use another peer"
                ) from None
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if item is _END:
            self._queue.appendleft(item)  # stays ended
            return None
        if isinstance(item, BaseException):
            self._queue.appendleft(item)
            raise item
        self._consumed += len(item)
        if self._consumed >= self._window // 4 and not self.remote_ended and self.error is None:
            self._allowance += self._consumed
            self.conn.send_frame(self.id, FrameType.WINDOW, 0, WINDOW_PAYLOAD.pack(self._consumed))
            self._consumed = 0
        return item

    async def send_chunk(self, chunk: Chunk, timeout_s: float) -> None:
        """Send one chunk (a buffer, or a tuple of buffers sent concatenated) as one DATA frame once the peer
        has granted credit; bounded by ``timeout_s``."""
        size = sum(memoryview(b).nbytes for b in chunk) if isinstance(chunk, tuple) else memoryview(chunk).nbytes
        if size > self.conn.config.max_frame_size_bytes:
            raise TransportError(
                f"chunk of {size} bytes on {self.method} exceeds max_frame_size_bytes="
                f"{self.conn.config.max_frame_size_bytes}; yield smaller chunks"
            )
        while self._credit <= 0 and self.error is None:
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._credit_waiter
            except TimeoutError:
                raise RpcTimeoutError(
                    f"{self.conn.peer_short} granted no window on {self.method} for {timeout_s:.1f}s "
                    "(it stopped reading); retry or use another peer"
                ) from None
            finally:
                self._credit_waiter = None
        if self.error is not None:
            raise self.error
        self._credit -= size
        self.conn.send_frame(self.id, FrameType.DATA, 0, chunk)
        await self.conn.drain()
        await asyncio.sleep(0)  # let other connections and streams run between chunks

    def send_end(self) -> None:
        if not self.local_ended and self.error is None:
            self.local_ended = True
            self.conn.send_frame(self.id, FrameType.END, 0, b"")

    def reset(self, reason: str) -> None:
        """Abort the stream on both sides (a no-op if the connection or the stream is already gone)."""
        if self.error is None:
            self.fail(TransportError(f"stream {self.method} was cancelled locally: {reason}"))
            self.conn.send_frame(self.id, FrameType.RESET, 0, reason.encode()[:1000])
