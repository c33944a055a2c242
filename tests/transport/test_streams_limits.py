"""Stream edge cases (stalls, early exits, oversized chunks) and the size and connection limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from swarm.p2p import RpcContext, Transport
from swarm.errors import HandshakeError, OverloadedError, RemoteError, RpcTimeoutError, TransportError
from tests.transport.conftest import Echo, MakeTransport

DEADLINE_S = 10


async def _echo(ctx: RpcContext, request: Echo) -> Echo:
    return Echo(text=request.text, number=request.number + 1)


async def _one(size: int) -> AsyncIterator[bytes]:
    yield bytes(size)


async def test_receiver_that_never_reads_times_the_sender_out(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    never = asyncio.Event()

    async def ignore(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        await never.wait()
        return Echo(), None

    async def many() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield bytes(64 * 1024)

    server.register_stream("test.ignore", Echo, ignore)
    server.register("test.echo", Echo, _echo)
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(RpcTimeoutError, match=r"test\.ignore"):
            async with client.open_stream(
                server.listen_maddrs[0], "test.ignore", Echo(), Echo, chunks=many(), timeout_s=1.0
            ):
                pass
        assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)).number == 1


async def test_stalled_reply_chunks_time_out_and_early_exit_resets(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    stop_producing = asyncio.Event()
    producer_closed = {1: asyncio.Event(), 2: asyncio.Event()}

    async def stall(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, AsyncIterator[bytes]]:
        async def out() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                if header.number == 1:
                    await stop_producing.wait()  # never set: stalls
                for _ in range(10_000):
                    yield bytes(1000)
            finally:
                producer_closed[header.number].set()

        return Echo(), out()

    server.register_stream("test.stall", Echo, stall)
    server.register("test.echo", Echo, _echo)
    addr = server.listen_maddrs[0]
    async with asyncio.timeout(DEADLINE_S):
        async with client.open_stream(addr, "test.stall", Echo(number=1), Echo, timeout_s=1.0) as s:
            chunks = s.chunks()
            assert await chunks.__anext__() == b"first"
            with pytest.raises(RpcTimeoutError, match="no chunk"):
                await chunks.__anext__()
        async with client.open_stream(addr, "test.stall", Echo(number=2), Echo) as s:
            async for _chunk in s.chunks():
                break  # leave early: the stream is reset and the server stops producing
        await producer_closed[2].wait()
        await producer_closed[1].wait()
        assert (await client.call(addr, "test.echo", Echo(), Echo)).number == 1


async def test_oversized_chunk_request_and_reply_fail_clearly(make_transport: MakeTransport) -> None:
    server = await make_transport(max_frame_size_bytes=1 << 20, max_message_size_bytes=1 << 16)
    client = await make_transport(max_frame_size_bytes=1 << 20, max_message_size_bytes=1 << 16)

    async def sink(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        return Echo(number=sum([len(c) async for c in chunks])), None

    async def big_reply(ctx: RpcContext, request: Echo) -> Echo:
        return Echo(text="x" * (1 << 17))

    server.register_stream("test.sink", Echo, sink)
    server.register("test.big", Echo, big_reply)
    server.register("test.echo", Echo, _echo)
    addr = server.listen_maddrs[0]
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(TransportError, match="exceeds max_frame_size_bytes"):
            async with client.open_stream(addr, "test.sink", Echo(), Echo, chunks=_one((1 << 20) + 1)):
                pass
        with pytest.raises(TransportError, match=r"exceeds max_message_size_bytes.*stream"):
            await client.call(addr, "test.echo", Echo(text="y" * (1 << 17)), Echo)
        with pytest.raises(RemoteError, match="return large payloads as chunks"):
            await client.call(addr, "test.big", Echo(), Echo)
        with pytest.raises(RemoteError, match="is unary"):
            async with client.open_stream(addr, "test.echo", Echo(), Echo, chunks=_one(10)):
                pass
        async with client.open_stream(addr, "test.sink", Echo(), Echo, chunks=_one(1 << 20)) as s:
            assert s.reply.number == 1 << 20


async def test_unary_call_to_a_streaming_reply_fails_clearly(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def download(
        ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]
    ) -> tuple[Echo, AsyncIterator[bytes]]:
        return Echo(), _one(10)

    server.register_stream("test.download", Echo, download)
    server.register("test.echo", Echo, _echo)
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(TransportError, match="streams its reply; call it with open_stream"):
            await client.call(server.listen_maddrs[0], "test.download", Echo(), Echo)
        assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)).number == 1


async def test_connection_limits(make_transport: MakeTransport) -> None:
    server = await make_transport(max_connections=1)
    server.register("test.echo", Echo, _echo)
    release = asyncio.Event()

    async def hold(ctx: RpcContext, request: Echo) -> Echo:
        await release.wait()
        return Echo(number=request.number + 1)

    server.register("test.hold", Echo, hold)
    first, second = await make_transport(), await make_transport()
    async with asyncio.timeout(DEADLINE_S):
        await first.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        held = asyncio.ensure_future(first.call(server.peer_id, "test.hold", Echo(number=5), Echo))
        while not server.connection_counts()["established"] or not _busy(server):
            await asyncio.sleep(0.01)
        # the only slot is busy (a request in flight): the newcomer is refused, and told why
        with pytest.raises((HandshakeError, TransportError)) as refused:
            await second.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        assert isinstance(refused.value, OverloadedError)
        assert "the peer is at its connection limit" in str(refused.value)
        release.set()
        assert (await held).number == 6  # the first is still served
        assert (await first.call(server.peer_id, "test.echo", Echo(), Echo)).number == 1
        # now the first is idle: the newcomer evicts it instead of being refused
        assert (await second.call(server.listen_maddrs[0], "test.echo", Echo(number=2), Echo)).number == 3
    dialler = await make_transport(max_connections=1)
    other = await make_transport()
    async with asyncio.timeout(DEADLINE_S):
        await dialler.connect(other.listen_maddrs[0])
        with pytest.raises(OverloadedError, match="max_connections=1"):
            await dialler.connect(first.listen_maddrs[0])


def _busy(transport: Transport) -> bool:
    return any(conn.streams for conn in transport._table.all)


@pytest.mark.slow
async def test_one_gib_stream_uses_bounded_memory(make_transport: MakeTransport) -> None:
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    server, client = await make_transport(), await make_transport()
    chunk = bytes(1 << 20)
    baseline = process.memory_info().rss
    peak = baseline

    async def sink(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        nonlocal peak
        total = 0
        async for data in chunks:
            total += len(data)
            if total % (32 << 20) == 0:
                peak = max(peak, process.memory_info().rss)
        return Echo(number=total), None

    async def one_gib() -> AsyncIterator[bytes]:
        for _ in range(1024):
            yield chunk  # the same 1 MiB object: the sender holds nothing, so growth is the transport's own

    server.register_stream("test.sink", Echo, sink)
    async with asyncio.timeout(120):
        async with client.open_stream(
            server.listen_maddrs[0], "test.sink", Echo(), Echo, chunks=one_gib(), timeout_s=60
        ) as s:
            assert s.reply.number == 1 << 30
    assert peak - baseline < 256 << 20, f"RSS grew by {(peak - baseline) >> 20} MiB while streaming 1 GiB"
