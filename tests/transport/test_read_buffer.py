"""The connection's read buffer: small when idle, grown (to a cap) under bulk data, trimmed back when quiet."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p import RpcContext, TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.traffic import Traffic
from swarm.p2p.framing import Frame, FrameType, WriteScratch
from swarm.p2p.readbuffer import LARGE_READ_BUFFER_BYTES, SMALL_READ_BUFFER_BYTES, ReadBuffer
from swarm.p2p.streams import Stream
from tests.transport.conftest import Echo, MakeTransport, seeded_identity

DEADLINE_S = 20
SMALL = SMALL_READ_BUFFER_BYTES
LARGE = LARGE_READ_BUFFER_BYTES


class _Owner:
    """A minimal ConnectionOwner: records the payload of every REQUEST frame it is given."""

    def __init__(self, expected_bytes: int) -> None:
        self.accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.payloads: list[bytes] = []
        self.expected_bytes = expected_bytes
        self.received_bytes = 0
        self.all_received = asyncio.Event()

    def on_connection_made(self, conn: Connection) -> None:
        if not conn.initiator and not self.accepted.done():
            self.accepted.set_result(conn)

    def on_request(self, conn: Connection, stream: Stream, frame: Frame) -> None:
        self.payloads.append(bytes(frame.payload))
        self.received_bytes += len(frame.payload)
        if self.received_bytes >= self.expected_bytes:
            self.all_received.set()

    def on_connection_closed(self, conn: Connection) -> None:
        pass

    def on_connection_warning(self, conn: Connection, reason: str) -> None:
        pass


class _TrackedConnection(Connection):
    """A Connection that says when its socket is really gone, so the test can wait for it."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.lost.set()


def _frames(rng: random.Random, total_bytes: int) -> list[bytes]:
    """Seeded payloads of mixed sizes (small ones and ones spanning many Noise records)."""
    frames, left = [], total_bytes
    while left > 0:
        size = min(left, rng.choice([100, 5000, 70_000, 600_000, 1_500_000]))
        frames.append(rng.randbytes(size))
        left -= size
    return frames


async def test_read_buffer_grows_under_bulk_data_and_trims_back_when_quiet() -> None:
    config = TransportConfig()
    frames = _frames(random.Random(7), 8 * 1024 * 1024)
    total = sum(map(len, frames))
    owner = _Owner(total)
    scratch = WriteScratch()
    loop = asyncio.get_running_loop()

    def make(initiator: bool) -> _TrackedConnection:
        return _TrackedConnection(
            config=config, initiator=initiator, owner=owner, local_short="t", scratch=scratch, traffic=Traffic()
        )

    server = await loop.create_server(lambda: make(False), "127.0.0.1", 0)
    client: _TrackedConnection | None = None
    accepted: _TrackedConnection | None = None
    try:
        async with asyncio.timeout(DEADLINE_S):
            port = server.sockets[0].getsockname()[1]
            _, client = await loop.create_connection(lambda: make(True), "127.0.0.1", port)
            accepted = await owner.accepted  # type: ignore[assignment]
            assert accepted is not None
            server_identity, client_identity = seeded_identity("rb-server"), seeded_identity("rb-client")
            await asyncio.gather(
                accepted.handshake(server_identity, X25519PrivateKey.generate(), None),
                client.handshake(client_identity, X25519PrivateKey.generate(), server_identity.peer_id),
            )
            accepted.begin_frames()  # what the transport does once its budget admits the connection
            client.begin_frames()
            assert len(accepted.read_buffer.buf) == SMALL and len(client.read_buffer.buf) == SMALL

            for i, payload in enumerate(frames):
                client.send_frame(1 + 2 * i, FrameType.REQUEST, 0, payload)
                await client.drain()
            await owner.all_received.wait()
            assert b"".join(owner.payloads) == b"".join(frames)  # intact, in order, across the resize
            assert len(accepted.read_buffer.buf) == LARGE  # grew, and only to the cap
            assert len(client.read_buffer.buf) == SMALL  # the side that received nothing kept the small buffer

            accepted.trim_read_buffer()
            assert len(accepted.read_buffer.buf) == LARGE  # reads filled it since the last trim: still busy
            accepted.trim_read_buffer()
            assert len(accepted.read_buffer.buf) == SMALL  # a whole quiet period: back to the initial size
            client.trim_read_buffer()
            assert len(client.read_buffer.buf) == SMALL

            owner.all_received.clear()
            owner.expected_bytes += 1000
            tail = random.Random(8).randbytes(1000)
            client.send_frame(1 + 2 * len(frames), FrameType.REQUEST, 0, tail)
            await client.drain()
            await owner.all_received.wait()
            assert owner.payloads[-1] == tail and accepted.is_open and client.is_open
    finally:
        for conn in (client, accepted):
            if conn is not None:
                conn.close("test over", warn=False)
        server.close()
        async with asyncio.timeout(DEADLINE_S):
            for conn in (client, accepted):
                if conn is not None:
                    await conn.lost.wait()
            await server.wait_closed()


async def test_transport_reaper_trims_a_grown_buffer(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    resized: list[int] = []
    trimmed = asyncio.Event()
    original = ReadBuffer.resize

    def recording_resize(self: ReadBuffer, size_bytes: int) -> None:
        original(self, size_bytes)
        resized.append(size_bytes)
        if size_bytes == SMALL:
            trimmed.set()

    monkeypatch.setattr(ReadBuffer, "resize", recording_resize)
    server, client = await make_transport(), await make_transport()
    payload = random.Random(9).randbytes(6 * 1024 * 1024)

    async def collect(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        received = bytearray()
        async for chunk in chunks:
            received += chunk
        return Echo(number=int(bytes(received) == payload)), None

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 512 * 1024):
            yield payload[i : i + 512 * 1024]

    server.register_stream("test.collect", Echo, collect)
    async with asyncio.timeout(DEADLINE_S):
        async with client.open_stream(server.listen_maddrs[0], "test.collect", Echo(), Echo, chunks=upload()) as s:
            assert s.reply.number == 1  # the server got every byte intact
        assert LARGE in resized  # bulk upload grew the server side's buffer
        await trimmed.wait()  # the reaper (period <= 1 s) trims it once the connection is quiet
    assert resized.index(SMALL) > resized.index(LARGE)
    assert client.connected_peers() == [server.peer_id]  # trimming is not closing
