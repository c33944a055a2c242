"""Request/response on top of a Connection: serving a handler, calling, and streaming with chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message, packb
from swarm.p2p.connection import Connection
from swarm.p2p.framing import (
    FLAG_CHUNKS,
    Chunk,
    ErrorCode,
    FrameType,
    RequestHead,
    code_text,
    decode_error,
    encode_error,
    encode_request,
)
from swarm.p2p.streams import Stream
from swarm.errors import (
    OverloadedError,
    ProtocolError,
    RemoteError,
    RpcTimeoutError,
    SwarmError,
    TransportError,
    known_code,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
ReplyFrame = tuple[FrameType, int, bytes | memoryview]  # (REPLY or ERROR, flags, payload)
UnaryHandler = Callable[["RpcContext", Any], Awaitable[Message]]
StreamHandler = Callable[
    ["RpcContext", Any, AsyncIterator[bytes]], Awaitable[tuple[Message, AsyncIterable[Chunk] | None]]
]


@dataclass(frozen=True, kw_only=True)
class RpcContext:
    """Who is calling: the authenticated remote PeerID and its socket address."""

    peer_id: PeerID
    remote_host: str
    remote_port: int
    method: str
    relayed: bool = False  # the request came through a relay's circuit (remote_host is the relay's)


@dataclass(frozen=True, kw_only=True)
class HandlerEntry:
    method: str
    request_type: type[Message]
    handler: Callable[..., Awaitable[Any]]
    streaming: bool


def reject(conn: Connection, stream: Stream, code: ErrorCode | str, message: str) -> None:
    """Answer a request with an error frame and forget its stream."""
    conn.send_frame(stream.id, FrameType.ERROR, 0, encode_error(code, message))
    conn.streams.pop(stream.id, None)


async def _request_chunks(stream: Stream, timeout_s: float) -> AsyncIterator[bytes]:
    while stream.expects_chunks and (chunk := await stream.next_chunk(timeout_s)) is not None:
        yield chunk


async def serve_request(conn: Connection, stream: Stream, entry: HandlerEntry, head: RequestHead) -> None:
    """Run one handler under the caller's deadline and send its reply (and reply chunks); errors become replies."""
    if conn.peer_id is None:
        raise TransportError("internal: a request on a connection without an authenticated peer")
    ctx = RpcContext(
        peer_id=conn.peer_id,
        remote_host=conn.remote_host,
        remote_port=conn.remote_port,
        method=entry.method,
        relayed=conn.relayed,
    )
    reply_sent = False
    deadline = asyncio.timeout(head.timeout_s)
    try:
        async with deadline:
            request = entry.request_type.from_wire(head.body)
            chunks: AsyncIterable[Chunk] | None = None
            if entry.streaming:
                reply, chunks = await entry.handler(ctx, request, _request_chunks(stream, head.timeout_s))
            else:
                reply = await entry.handler(ctx, request)
            if not isinstance(reply, Message):
                raise TypeError(f"handler of {entry.method} returned {type(reply).__name__}, not a Message")
            body = packb(reply.to_wire())
            if len(body) > conn.config.max_message_size_bytes:
                raise TransportError(
                    f"reply of {len(body)} bytes exceeds max_message_size_bytes={conn.config.max_message_size_bytes}; "
                    "return large payloads as chunks"
                )
            conn.send_frame(stream.id, FrameType.REPLY, FLAG_CHUNKS if chunks is not None else 0, body)
            reply_sent = True
            if chunks is not None:
                await _send_all(stream, chunks, head.timeout_s)
            await conn.drain()
    except TimeoutError as e:
        message = (
            f"handler did not finish within the caller's {head.timeout_s:.1f}s deadline"
            if deadline.expired()
            else f"the handler timed out: {e or type(e).__name__}"
        )
        _fail(conn, stream, reply_sent, ErrorCode.TIMEOUT, message)
    except ProtocolError as e:
        _fail(conn, stream, reply_sent, e.code, str(e))
    except SwarmError as e:  # the reply carries the error's code: callers decide on it, never on the text
        _fail(conn, stream, reply_sent, e.code, f"{type(e).__name__}: {e}")
    except Exception as e:  # a bug in a handler must not take the node down
        log.exception("%s: handler of %s failed on a request from %s", conn.local_short, entry.method, conn.peer_short)
        _fail(conn, stream, reply_sent, ErrorCode.INTERNAL, f"{type(e).__name__} in the handler (see the peer's log)")
    finally:
        conn.streams.pop(stream.id, None)
        if stream.expects_chunks and not stream.remote_ended and stream.error is None:
            conn.send_frame(stream.id, FrameType.RESET, 0, b"the handler finished without reading all chunks")


def _fail(conn: Connection, stream: Stream, reply_sent: bool, code: ErrorCode | str, message: str) -> None:
    text = code_text(code)
    log.warning(
        "%s: request %s from %s failed (%s): %s", conn.local_short, stream.method, conn.peer_short, text, message
    )
    if stream.error is not None:
        return
    if reply_sent:
        conn.send_frame(stream.id, FrameType.RESET, 0, f"{text}: {message}".encode()[:1000])
    else:
        conn.send_frame(stream.id, FrameType.ERROR, 0, encode_error(text, message))


def _parse_reply(conn: Connection, stream: Stream, result: ReplyFrame, reply_type: type[M]) -> M:
    ftype, _, payload = result
    if ftype is FrameType.ERROR:
        sent, message = decode_error(payload)
        code = known_code(sent)
        if code != sent:
            log.warning(
                "%s: %s answered %s with a malformed or unknown error code %r; read as %r",
                conn.local_short,
                conn.peer_short,
                stream.method,
                sent[:40],
                code,
            )
        if code == OverloadedError.code:
            raise OverloadedError(f"{conn.peer_short} is overloaded ({message}); retry later or use another peer")
        raise RemoteError(f"{conn.peer_short} answered {stream.method} with an error ({code}): {message}", code=code)
    return reply_type.unpack(payload, max_size_bytes=conn.config.max_message_size_bytes)


def _encode(conn: Connection, method: str, request: Message, timeout_s: float) -> bytes:
    payload = encode_request(method, timeout_s, request.to_wire())
    if len(payload) > conn.config.max_message_size_bytes:
        raise TransportError(
            f"request {method} of {len(payload)} bytes exceeds max_message_size_bytes="
            f"{conn.config.max_message_size_bytes}; send large payloads as stream chunks"
        )
    return payload


async def _await_reply(conn: Connection, stream: Stream, timeout_s: float) -> ReplyFrame:
    if stream.reply is None:
        raise TransportError("internal: a stream without a reply future")
    try:
        async with asyncio.timeout(timeout_s):
            await conn.drain()
            return await stream.reply
    except TimeoutError:
        stream.reset("the caller's deadline passed")
        raise RpcTimeoutError(
            f"{conn.peer_short} did not answer {stream.method} within {timeout_s:.1f}s; "
            "it may be overloaded or gone: retry, raise the timeout, or use another peer"
        ) from None


async def call(conn: Connection, method: str, request: Message, reply_type: type[M], timeout_s: float) -> M:
    """One unary request on ``conn``; RpcTimeoutError after ``timeout_s``, RemoteError if the peer failed it."""
    payload = _encode(conn, method, request, timeout_s)
    stream = conn.open_stream(method)
    try:
        conn.send_frame(stream.id, FrameType.REQUEST, 0, payload)
        result = await _await_reply(conn, stream, timeout_s)
        if result[1] & FLAG_CHUNKS:
            stream.reset("the caller expected a unary reply")
            raise TransportError(f"{method} on {conn.peer_short} streams its reply; call it with open_stream()")
        return _parse_reply(conn, stream, result, reply_type)
    finally:
        if stream.reply is not None and stream.reply.cancelled():  # the caller was cancelled: stop the handler
            stream.reset("the caller cancelled the call")
        conn.streams.pop(stream.id, None)


class StreamReply(Generic[M]):
    """The caller's side of an open stream: the typed ``reply`` header and the reply's byte ``chunks()``."""

    def __init__(self, stream: Stream, reply: M, has_chunks: bool, timeout_s: float) -> None:
        self._stream = stream
        self.reply = reply
        self.has_chunks = has_chunks
        self.peer_id = stream.conn.peer_id
        self._timeout_s = timeout_s

    async def chunks(self) -> AsyncIterator[bytes]:
        """The reply's chunks, as the handler yielded them; each wait is bounded by the stream's timeout."""
        while self.has_chunks and (chunk := await self._stream.next_chunk(self._timeout_s)) is not None:
            yield chunk


async def _send_all(stream: Stream, chunks: AsyncIterable[Chunk], timeout_s: float) -> None:
    """Send every chunk, then END; the iterator is closed however this ends (so its cleanup runs now)."""
    try:
        async for chunk in chunks:
            await stream.send_chunk(chunk, timeout_s)
        stream.send_end()
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _upload(stream: Stream, chunks: AsyncIterable[Chunk], timeout_s: float) -> None:
    try:
        await _send_all(stream, chunks, timeout_s)
    except SwarmError as e:
        stream.reset(f"upload failed: {e}")
    except Exception as e:  # the caller's chunk iterator failed: abort the stream, the caller sees why
        stream.reset(f"the request's chunk iterator raised {type(e).__name__}: {e}")


@contextlib.asynccontextmanager
async def open_stream(
    conn: Connection,
    method: str,
    header: Message,
    reply_type: type[M],
    chunks: AsyncIterable[Chunk] | None,
    timeout_s: float,
) -> AsyncIterator[StreamReply[M]]:
    """Send ``header`` (and ``chunks``), wait for the typed reply; each wait is bounded by ``timeout_s``."""
    payload = _encode(conn, method, header, timeout_s)
    stream = conn.open_stream(method)
    stream.expects_chunks = True
    upload: asyncio.Task[None] | None = None
    try:
        conn.send_frame(stream.id, FrameType.REQUEST, FLAG_CHUNKS if chunks is not None else 0, payload)
        stream.announce_window()
        if chunks is not None:
            upload = asyncio.get_running_loop().create_task(_upload(stream, chunks, timeout_s))
        else:
            stream.local_ended = True
        result = await _await_reply(conn, stream, timeout_s)
        reply = _parse_reply(conn, stream, result, reply_type)
        has_chunks = bool(result[1] & FLAG_CHUNKS)
        if not has_chunks:
            stream.expects_chunks = False
        yield StreamReply(stream, reply, has_chunks, timeout_s)
        if upload is not None:
            done, _ = await asyncio.wait([upload], timeout=timeout_s)
            if not done:
                raise RpcTimeoutError(f"the upload of {method} to {conn.peer_short} stalled for {timeout_s:.1f}s")
    finally:
        if upload is not None and not upload.done():
            upload.cancel()
            await asyncio.gather(upload, return_exceptions=True)
        finished = stream.local_ended and (stream.remote_ended or not stream.expects_chunks)
        if not finished:
            stream.reset("the caller closed the stream before its end")
        conn.streams.pop(stream.id, None)
