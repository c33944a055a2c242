"""Frame parsing: any split of the byte stream, the size limit before allocation, unknown types, heads."""

from __future__ import annotations

import random

import pytest

from swarm.p2p.framing import (
    FRAME_HEADER,
    ErrorCode,
    Frame,
    FrameParser,
    FrameType,
    decode_error,
    decode_request,
    encode_error,
    encode_request,
)
from swarm.p2p.messages import packb
from swarm.errors import FrameTooLargeError, ProtocolError


def _encode(stream_id: int, ftype: FrameType, flags: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(stream_id, ftype, flags, len(payload)) + payload


def test_frames_survive_any_split() -> None:
    rng = random.Random(1)
    frames = [Frame(rng.randrange(1, 100), FrameType.DATA, 0, rng.randbytes(rng.randrange(0, 5000))) for _ in range(50)]
    stream = b"".join(_encode(f.stream_id, f.type, f.flags, f.payload) for f in frames)
    got: list[Frame] = []
    parser = FrameParser(1 << 20, got.append)
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 3, 7, 100, 4096, 70000])
        parser.feed(stream[pos : pos + step])
        pos += step
    assert got == frames


def test_oversized_frame_is_refused_at_the_header() -> None:
    parser = FrameParser(1024, lambda f: None)
    with pytest.raises(FrameTooLargeError, match="max_frame_size_bytes=1024"):
        parser.feed(FRAME_HEADER.pack(1, FrameType.DATA, 0, 2**32 - 1))  # no payload needed to refuse


def test_unknown_frame_type_and_flags_are_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        FrameParser(1024, lambda f: None).feed(FRAME_HEADER.pack(1, 99, 0, 0))
    with pytest.raises(ProtocolError, match="unknown frame flags"):
        FrameParser(1024, lambda f: None).feed(FRAME_HEADER.pack(1, FrameType.DATA, 0x80, 0))


def test_request_head_round_trip_and_checks() -> None:
    head = decode_request(encode_request("dht.ping", 2.5, {"a": 1}), max_size_bytes=1024)
    assert (head.method, head.timeout_s, head.body) == ("dht.ping", 2.5, {"a": 1})
    for bad in ([1, 2, 3], ["m", 0, {}], ["m", True, {}], ["m", 10], {"method": "m"}):
        with pytest.raises(ProtocolError):
            decode_request(packb(bad), max_size_bytes=1024)
    with pytest.raises(ProtocolError):
        decode_request(b"\xc1", max_size_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_request(encode_request("m", 1, "x" * 2000), max_size_bytes=1024)


def test_error_round_trip_and_checks() -> None:
    assert decode_error(encode_error(ErrorCode.FAILED, "boom")) == ("failed", "boom")
    with pytest.raises(ProtocolError):
        decode_error(packb({"code": 1}))
