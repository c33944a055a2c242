"""Bad input: each case closes only the offending connection within a deadline, logs a warning, keeps serving."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.maddr import parse_maddr
from swarm.p2p import RpcContext, Transport
from swarm.p2p.framing import FRAME_HEADER, RECORD_PREFIX, WINDOW_PAYLOAD, FrameType, encode_request
from swarm.p2p.noise import CipherState, HandshakeState, make_payload
from tests.transport.conftest import Echo, MakeTransport, seeded_identity

DEADLINE_S = 10


class RawPeer:
    """A hand-driven client: plain TCP, optionally our own XX handshake, then arbitrary records."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.send: CipherState | None = None

    @classmethod
    async def connect(cls, server: Transport) -> RawPeer:
        addr = parse_maddr(server.listen_maddrs[0])
        return cls(*await asyncio.open_connection(addr.host, addr.port))

    def write_record(self, message: bytes) -> None:
        self.writer.write(RECORD_PREFIX.pack(len(message)) + message)

    async def read_record(self) -> bytes:
        size = RECORD_PREFIX.unpack(await self.reader.readexactly(2))[0]
        return await self.reader.readexactly(size)

    async def handshake(self, *, sign_other_key: bool = False) -> None:
        static = X25519PrivateKey.generate()
        hs = HandshakeState(initiator=True, static_key=static)
        self.write_record(hs.write_message(b""))
        hs.read_message(await self.read_record())
        signed = X25519PrivateKey.generate() if sign_other_key else static
        self.write_record(hs.write_message(make_payload(seeded_identity("raw"), signed)))
        self.send, _ = hs.split()
        if not sign_other_key:  # a PING round trip: the server has finished its side of the handshake
            self.write_frame(0, FrameType.PING, 0, b"12345678")
            await self.read_record()

    def write_frame(self, stream_id: int, ftype: int, flags: int, payload: bytes, *, length: int | None = None) -> None:
        assert self.send is not None
        header = FRAME_HEADER.pack(stream_id, ftype, flags, len(payload) if length is None else length)
        self.write_record(self.send.encrypt_with_ad(b"", header + payload))

    async def closed_by_server(self) -> bool:
        """True once the server closed the socket (reads until EOF or reset, with the test's deadline)."""
        try:
            while await self.reader.read(1 << 20):
                pass
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def _echo(ctx: RpcContext, request: Echo) -> Echo:
    return Echo(number=request.number + 1)


async def _still_serves(server: Transport, make_transport: MakeTransport) -> None:
    other = await make_transport()
    assert (await other.call(server.listen_maddrs[0], "test.echo", Echo(number=1), Echo)).number == 2


@pytest.fixture
async def server(make_transport: MakeTransport) -> Transport:
    t = await make_transport(
        "server",
        handshake_timeout_s=1.0,
        idle_timeout_s=1.0,
        write_timeout_s=0.5,
        write_buffer_high_bytes=65535,
        max_frame_size_bytes=1 << 20,
        max_message_size_bytes=1 << 19,
    )
    t.register("test.echo", Echo, _echo)
    return t


async def _expect_closed(peer: RawPeer, caplog: pytest.LogCaptureFixture, warning: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
        assert await peer.closed_by_server()
        while warning not in caplog.text:  # the warning is logged when the server closes; bounded by the deadline
            await asyncio.sleep(0.01)
    peer.close()


async def test_random_bytes(server: Transport, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture) -> None:
    peer = await RawPeer.connect(server)
    peer.writer.write(random.Random(0).randbytes(300_000))
    await _expect_closed(peer, caplog, "closing connection")
    async with asyncio.timeout(DEADLINE_S):
        await _still_serves(server, make_transport)


async def test_never_finishing_the_handshake(
    server: Transport, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await RawPeer.connect(server)
    await _expect_closed(peer, caplog, "handshake not finished within handshake_timeout_s=1.0s")
    async with asyncio.timeout(DEADLINE_S):
        await _still_serves(server, make_transport)


async def test_handshake_with_the_wrong_key(
    server: Transport, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await RawPeer.connect(server)
    async with asyncio.timeout(DEADLINE_S):
        await peer.handshake(sign_other_key=True)
    await _expect_closed(peer, caplog, "does not match its Noise static key")
    async with asyncio.timeout(DEADLINE_S):
        await _still_serves(server, make_transport)


@pytest.mark.parametrize(
    "case, warning",
    [
        ("over_limit", "over max_frame_size_bytes=1048576"),
        ("unknown_type", "unknown frame type 99"),
        ("forged_record", "failed authentication"),
        ("truncated_then_eof", "truncated"),
        ("truncated_then_silence", None),
        ("large_pong", "PONG frame of 100000 bytes; expected 8"),  # a large payload is an unhashable buffer
        ("short_ping", "PING frame of 3 bytes; expected 8"),
    ],
)
async def test_bad_frames_after_the_handshake(
    server: Transport, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture, case: str, warning: str | None
) -> None:
    peer = await RawPeer.connect(server)
    async with asyncio.timeout(DEADLINE_S):
        await peer.handshake()
    if case == "over_limit":
        peer.write_frame(1, FrameType.REQUEST, 0, b"", length=(1 << 20) + 1)
    elif case == "unknown_type":
        peer.write_frame(1, 99, 0, b"")
    elif case == "forged_record":
        peer.write_record(random.Random(1).randbytes(100))
    elif case == "large_pong":  # header and payload over several records, as a real sender splits them
        assert peer.send is not None
        data = FRAME_HEADER.pack(0, FrameType.PONG, 0, 100_000) + bytes(100_000)
        for i in range(0, len(data), 60_000):
            peer.write_record(peer.send.encrypt_with_ad(b"", data[i : i + 60_000]))
    elif case == "short_ping":
        peer.write_frame(0, FrameType.PING, 0, b"abc")
    else:
        peer.write_frame(1, FrameType.REQUEST, 0, b"x" * 10, length=100)  # announces 100 bytes, sends 10
        if case == "truncated_then_eof":
            peer.writer.write_eof()
    if warning is None:  # a stalled half frame is closed by the idle timeout
        async with asyncio.timeout(DEADLINE_S):
            assert await peer.closed_by_server()
        peer.close()
    else:
        await _expect_closed(peer, caplog, warning)
    async with asyncio.timeout(DEADLINE_S):
        await _still_serves(server, make_transport)


async def test_malformed_request_gets_an_error_reply_and_the_connection_stays(
    server: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await RawPeer.connect(server)
    async with asyncio.timeout(DEADLINE_S):
        await peer.handshake()
        peer.write_frame(1, FrameType.REQUEST, 0, b"\xc1\xc1")  # not msgpack
        peer.write_frame(3, FrameType.REQUEST, 0, encode_request("test.echo", 5, {"number": "not an int"}))
        peer.write_frame(5, FrameType.REQUEST, 0, encode_request("test.echo", 5, {"number": 41}))
        records = [await peer.read_record() for _ in range(3)]
    assert len(records) == 3  # two error replies and one good reply, all on the same connection
    assert "malformed request" in caplog.text and "failed (bad_request)" in caplog.text
    peer.close()


async def test_peer_that_stops_reading_mid_stream(
    server: Transport, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    async def firehose(
        ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]
    ) -> tuple[Echo, AsyncIterator[bytes]]:
        async def out() -> AsyncIterator[bytes]:
            for _ in range(256):
                yield bytes(1 << 20)

        return Echo(), out()

    server.register_stream("test.firehose", Echo, firehose)
    peer = await RawPeer.connect(server)
    async with asyncio.timeout(DEADLINE_S):
        await peer.handshake()
    peer.write_frame(1, FrameType.REQUEST, 0, encode_request("test.firehose", 30, {}))
    peer.write_frame(1, FrameType.WINDOW, 0, WINDOW_PAYLOAD.pack(2**32 - 1))  # grants credit, then never reads
    async with asyncio.timeout(DEADLINE_S):
        while "stopped reading" not in caplog.text:
            await asyncio.sleep(0.02)
        await _still_serves(server, make_transport)
    peer.close()


async def test_records_sent_right_after_message_3_are_kept(server: Transport) -> None:
    peer = await RawPeer.connect(server)
    static = X25519PrivateKey.generate()
    hs = HandshakeState(initiator=True, static_key=static)
    async with asyncio.timeout(DEADLINE_S):
        peer.write_record(hs.write_message(b""))
        hs.read_message(await peer.read_record())
        message_3 = hs.write_message(make_payload(seeded_identity("raw"), static))
        peer.send, _ = hs.split()
        # message 3 and 40 pings leave in one write, before the server has processed message 3
        buffer = bytearray(RECORD_PREFIX.pack(len(message_3)) + message_3)
        for i in range(40):
            record = peer.send.encrypt_with_ad(b"", FRAME_HEADER.pack(0, FrameType.PING, 0, 8) + b"%8d" % i)
            buffer += RECORD_PREFIX.pack(len(record)) + record
        peer.writer.write(bytes(buffer))
        pongs = [await peer.read_record() for _ in range(40)]
    assert len(pongs) == 40
    peer.close()
