"""Mux frames inside the encrypted byte stream, and the typed heads of requests and errors.

After the handshake each direction of a connection is a sequence of Noise transport messages, each with a
2-byte big-endian length prefix (at most 65535 bytes, tag included). Their plaintexts form one byte stream of
mux frames::

    stream_id u32 | type u8 | flags u8 | length u32 | payload[length]

``length`` is checked against ``max_frame_size_bytes`` before any buffer for the payload exists.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy

from swarm.errors import GENERIC_CODE, FrameTooLargeError, ProtocolError, is_valid_code, register_code
from swarm.p2p.messages import packb, unpackb

FRAME_HEADER = struct.Struct(">IBBI")
FRAME_HEADER_BYTES = FRAME_HEADER.size
RECORD_PREFIX = struct.Struct(">H")
WINDOW_PAYLOAD = struct.Struct(">I")
PING_PAYLOAD_BYTES = 8

Buffer = bytes | bytearray | memoryview
Chunk = Buffer | tuple[Buffer, ...]  # a tuple is sent as one DATA frame, its buffers concatenated but never joined


class WriteScratch:
    """One reusable buffer that frames are encrypted into, shared by a transport's connections.

    Writes are synchronous, so one buffer serves them all; it is reused only when the socket took every byte
    (write buffer empty afterwards), so a transport that keeps a reference to unsent data never sees it change.
    """

    def __init__(self, max_bytes: int = 2 * 1024 * 1024) -> None:
        self._buffer: bytearray | None = None
        self._max_bytes = max_bytes

    def take(self, size: int) -> bytearray:
        buffer, self._buffer = self._buffer, None
        return buffer if buffer is not None and len(buffer) >= size else bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        if len(buffer) <= self._max_bytes:
            self._buffer = buffer


class FrameType(enum.IntEnum):
    REQUEST = 1  # payload: packb([method, timeout_ms, body])
    REPLY = 2  # payload: packb(body)
    ERROR = 3  # payload: packb({"code": str token, "message": str}); see encode_error
    DATA = 4  # payload: one chunk of a stream
    END = 5  # no more DATA in this direction
    WINDOW = 6  # payload: u32 more bytes the sender of this frame will accept on the stream
    RESET = 7  # payload: utf-8 reason; the stream is aborted in both directions
    PING = 8  # payload: 8 opaque bytes, echoed in PONG
    PONG = 9


FLAG_CHUNKS = 0x01  # on REQUEST / REPLY: DATA frames follow, then END
_KNOWN_FLAGS = FLAG_CHUNKS


class ErrorCode(enum.StrEnum):
    """The transport's own error codes. A handler's SwarmError sends its class's ``code`` (swarm.errors)."""

    OVERLOADED = "overloaded"
    UNKNOWN_METHOD = "unknown_method"
    BAD_REQUEST = "bad_request"
    FAILED = "failed"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


for _code in ErrorCode:
    register_code(_code.value)

MAX_ERROR_MESSAGE_CHARS = 4000
MAX_ERROR_PAYLOAD_BYTES = 16 * 1024


def code_text(code: ErrorCode | str) -> str:
    """The wire token of ``code``: a valid token as it is, anything else as the generic code."""
    text = code.value if isinstance(code, ErrorCode) else code
    return text if is_valid_code(text) else GENERIC_CODE


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: FrameType
    flags: int
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    timeout_s: float
    body: Any  # the request message's wire form (checked by its Message class)


def encode_request(method: str, timeout_s: float, body: Any) -> bytes:
    return packb([method, max(1, int(timeout_s * 1000)), body])


def decode_request(payload: bytes | memoryview, *, max_size_bytes: int) -> RequestHead:
    obj = unpackb(payload, max_size_bytes=max_size_bytes)
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not isinstance(obj[0], str)
        or not isinstance(obj[1], int)
        or isinstance(obj[1], bool)
        or not 0 < obj[1] <= 86_400_000
    ):
        raise ProtocolError("request head must be [method: str, timeout_ms: int in (0, 86400000], body]")
    return RequestHead(method=obj[0], timeout_s=obj[1] / 1000.0, body=obj[2])


def encode_error(code: ErrorCode | str, message: str) -> bytes:
    """An ERROR payload: ``{code, message}``; the code is a short ASCII token (see swarm.errors)."""
    return packb({"code": code_text(code), "message": message[:MAX_ERROR_MESSAGE_CHARS]})


def decode_error(payload: bytes | memoryview) -> tuple[str, str]:
    """``(code, message)`` of an ERROR payload as sent; ProtocolError unless it is a map of two strings.

    The code is not checked here: the caller reads it with `swarm.errors.known_code` (malformed or unknown
    codes become the generic one).
    """
    obj = unpackb(payload, max_size_bytes=MAX_ERROR_PAYLOAD_BYTES)
    if not isinstance(obj, dict) or not isinstance(obj.get("code"), str) or not isinstance(obj.get("message"), str):
        raise ProtocolError("error frame must be a map {code: str, message: str}")
    return obj["code"], obj["message"]


class FrameParser:
    """Turns decrypted plaintext pieces into frames; calls ``on_frame`` for each complete one.

    The payload length is checked against ``max_frame_size_bytes`` as soon as the header is complete, before
    any buffer for it exists. A payload over ``DIRECT_PAYLOAD_BYTES`` gets one buffer that records may decrypt
    into directly (``direct_target`` / ``advance``) and is delivered as a writable memoryview that nothing else
    refers to (uninitialized memory, filled completely before delivery: no zero-fill pass); smaller ones as bytes.
    Raises ProtocolError (or FrameTooLargeError) on anything malformed.
    """

    DIRECT_PAYLOAD_BYTES = 64 * 1024

    def __init__(self, max_frame_size_bytes: int, on_frame: Callable[[Frame], None]) -> None:
        self._max = max_frame_size_bytes
        self._on_frame = on_frame
        self._header = bytearray()
        self._head: tuple[int, FrameType, int] | None = None
        self._need = 0
        self._parts: list[memoryview] = []
        self._buffer: memoryview | None = None
        self._filled = 0

    @property
    def mid_frame(self) -> bool:
        """True while a frame has started but not finished."""
        return bool(self._header) or self._head is not None

    def direct_target(self, size: int) -> memoryview | None:
        """Where the next ``size`` plaintext bytes go if they all belong to the current large payload, else None."""
        if self._buffer is None or self._need < size or size == 0:
            return None
        return self._buffer[self._filled : self._filled + size]

    def advance(self, size: int) -> None:
        """``size`` bytes were written into the view ``direct_target`` gave."""
        self._filled += size
        self._need -= size
        if self._need == 0:
            self._finish()

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._head is None:
                if not self._header and end - pos >= FRAME_HEADER_BYTES:
                    fields = FRAME_HEADER.unpack_from(view, pos)
                    pos += FRAME_HEADER_BYTES
                else:
                    take = min(FRAME_HEADER_BYTES - len(self._header), end - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < FRAME_HEADER_BYTES:
                        return
                    fields = FRAME_HEADER.unpack(self._header)
                    self._header.clear()
                self._start(*fields)
                if self._need == 0:
                    self._finish()
                continue
            take = min(self._need, end - pos)
            if self._buffer is not None:
                self._buffer[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
            else:
                self._parts.append(view[pos : pos + take])
            pos += take
            self._need -= take
            if self._need == 0:
                self._finish()

    def _start(self, stream_id: int, ftype: int, flags: int, length: int) -> None:
        if length > self._max:
            raise FrameTooLargeError(
                f"frame of {length} bytes announced, over max_frame_size_bytes={self._max}; closing the connection"
            )
        try:
            frame_type = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}; closing the connection") from None
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"unknown frame flags {flags:#x}; closing the connection")
        self._head = (stream_id, frame_type, flags)
        self._need = length
        if length > self.DIRECT_PAYLOAD_BYTES:
            self._buffer, self._filled = numpy.empty(length, dtype=numpy.uint8).data, 0

    def _finish(self) -> None:
        head, parts, buffer = self._head, self._parts, self._buffer
        if head is None:
            raise ProtocolError("frame payload without a header; this is a bug in the frame parser")
        self._head, self._parts, self._buffer = None, [], None
        payload: bytes | memoryview
        if buffer is not None:
            payload = buffer
        elif len(parts) == 1:
            payload = bytes(parts[0])
        else:
            payload = b"".join(parts)
        self._on_frame(Frame(head[0], head[1], head[2], payload))
