"""Unary RPC, streams and connection management between real transports on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import cast

import pytest

from swarm.p2p.connection import Connection
from swarm.p2p.conntable import ConnectionTable
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.messages import Message, packb
from swarm.p2p import RpcContext, Transport, TransportConfig
from swarm.p2p.framing import Frame, FrameType
from swarm.errors import (
    ConfigError,
    OverloadedError,
    PeerIDMismatchError,
    RemoteError,
    RpcTimeoutError,
    SwarmError,
    TransportError,
)
from tests.transport.conftest import Echo, MakeTransport, seeded_identity


@dataclass(frozen=True, kw_only=True)
class _WrongEcho(Message):
    text: int


async def _echo(ctx: RpcContext, request: Echo) -> Echo:
    return Echo(text=f"{request.text}:{ctx.peer_id.to_base58()}", number=request.number + 1)


async def test_unary_call_authenticates_both_sides(make_transport: MakeTransport) -> None:
    server, client = await make_transport("s"), await make_transport("c")
    server.register("test.echo", Echo, _echo)
    async with asyncio.timeout(10):
        reply = await client.call(server.listen_maddrs[0], "test.echo", Echo(text="hi", number=1), Echo)
    assert reply == Echo(text=f"hi:{client.peer_id.to_base58()}", number=2)
    assert client.connected_peers() == [server.peer_id] and server.connected_peers() == [client.peer_id]
    assert server.listen_maddrs[0].endswith(f"/p2p/{server.peer_id.to_base58()}")


async def test_concurrent_calls_share_one_connection(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    started = 0
    release = asyncio.Event()

    async def slow(ctx: RpcContext, request: Echo) -> Echo:
        nonlocal started
        started += 1
        if started == 50:
            release.set()
        await release.wait()  # all 50 are in flight at once before any answers
        return Echo(number=request.number)

    server.register("test.slow", Echo, slow)
    client.add_addresses(server.peer_id, [parse_maddr(server.listen_maddrs[0])])
    async with asyncio.timeout(20):
        replies = await asyncio.gather(
            *(client.call(server.peer_id, "test.slow", Echo(number=i), Echo) for i in range(50))
        )
    assert [r.number for r in replies] == list(range(50))
    assert len(client._table.all) == 1 and len(server._table.all) == 1  # reused, not one connection per call


async def test_deadline_cancels_the_remote_handler(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    cancelled = asyncio.Event()

    async def hang(ctx: RpcContext, request: Echo) -> Echo:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return request

    server.register("test.hang", Echo, hang)
    async with asyncio.timeout(10):
        with pytest.raises(RpcTimeoutError, match=r"did not answer test\.hang within 0\.2s"):
            await client.call(server.listen_maddrs[0], "test.hang", Echo(), Echo, timeout_s=0.2)
        await cancelled.wait()  # the RESET reached the server, which cancelled the handler
        server.register("test.echo", Echo, _echo)
        assert (await client.call(server.peer_id, "test.echo", Echo(number=5), Echo)).number == 6


async def test_errors_become_remote_errors_and_the_connection_stays(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = await make_transport(), await make_transport()

    async def fail(ctx: RpcContext, request: Echo) -> Echo:
        raise SwarmError("no such record; store it first")

    async def crash(ctx: RpcContext, request: Echo) -> Echo:
        raise KeyError("bug")

    server.register("test.fail", Echo, fail)
    server.register("test.crash", Echo, crash)
    server.register("test.echo", Echo, _echo)
    addr = server.listen_maddrs[0]
    async with asyncio.timeout(10):
        with pytest.raises(RemoteError, match="no such record; store it first"):
            await client.call(addr, "test.fail", Echo(), Echo)
        with pytest.raises(RemoteError, match="KeyError in the handler"):
            await client.call(addr, "test.crash", Echo(), Echo)
        with pytest.raises(RemoteError, match=r"serves no method 'test\.nope'"):
            await client.call(addr, "test.nope", Echo(), Echo)
        with pytest.raises(RemoteError, match="bad_request"):  # fails Echo.from_wire on the server
            await client.call(addr, "test.echo", _WrongEcho(text=5), Echo)  # type: ignore[arg-type]
        assert (await client.call(addr, "test.echo", Echo(number=1), Echo)).number == 2
    assert len(server._table.all) == 1
    assert "unknown method" in caplog.text and "failed (bad_request)" in caplog.text


async def test_inflight_limit_answers_overloaded(make_transport: MakeTransport) -> None:
    server = await make_transport(max_inflight_requests_per_peer=2)
    client = await make_transport()
    release = asyncio.Event()

    async def block(ctx: RpcContext, request: Echo) -> Echo:
        await release.wait()
        return request

    server.register("test.block", Echo, block)
    addr = server.listen_maddrs[0]
    async with asyncio.timeout(10):
        await client.connect(addr)
        blocked = [asyncio.create_task(client.call(addr, "test.block", Echo(number=i), Echo)) for i in range(2)]
        while len(next(iter(server._table.all)).tasks) < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="overloaded"):
            await client.call(addr, "test.block", Echo(), Echo)
        release.set()
        assert [r.number for r in await asyncio.gather(*blocked)] == [0, 1]


async def test_dialling_the_wrong_peer_id_fails_clearly(make_transport: MakeTransport) -> None:
    server, client = await make_transport("b"), await make_transport()
    addr = parse_maddr(server.listen_maddrs[0])
    wrong = seeded_identity("a").peer_id
    async with asyncio.timeout(10):
        with pytest.raises(PeerIDMismatchError, match=f"expecting peer {wrong}.*proved to be {server.peer_id}"):
            await client.connect(addr.with_peer_id(wrong))
    assert client.connected_peers() == []


async def test_unknown_peer_closed_port_and_self_fail_clearly(make_transport: MakeTransport) -> None:
    client = await make_transport()
    async with asyncio.timeout(10):
        with pytest.raises(TransportError, match="is this node itself"):
            await client.connect(client.listen_maddrs[0])
    assert client.connected_peers() == []
    gone = await make_transport()
    addr = gone.listen_maddrs[0]
    await gone.stop()
    async with asyncio.timeout(10):
        with pytest.raises(TransportError, match="no known address"):
            await client.call(seeded_identity("nobody").peer_id, "x", Echo(), Echo)
        with pytest.raises(TransportError, match="cannot connect"):
            await client.call(addr, "x", Echo(), Echo)


async def _chunks(total_bytes: int, chunk_bytes: int) -> AsyncIterator[bytes]:
    for start in range(0, total_bytes, chunk_bytes):
        yield bytes([start // chunk_bytes % 256]) * min(chunk_bytes, total_bytes - start)


async def test_stream_both_directions_keeps_chunk_boundaries(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def reverse(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, AsyncIterator[bytes]]:
        received = [chunk async for chunk in chunks]

        async def back() -> AsyncIterator[bytes]:
            for chunk in reversed(received):
                yield chunk

        return Echo(number=len(received)), back()

    server.register_stream("test.reverse", Echo, reverse)
    sent = [chunk async for chunk in _chunks(5_000_000, 300_000)]
    async with asyncio.timeout(30):
        async with client.open_stream(
            server.listen_maddrs[0], "test.reverse", Echo(), Echo, chunks=_chunks(5_000_000, 300_000)
        ) as s:
            assert s.reply.number == len(sent)
            got = [chunk async for chunk in s.chunks()]
    assert got == list(reversed(sent))


async def test_tuple_chunks_arrive_as_one_concatenated_chunk(make_transport: MakeTransport) -> None:
    """A chunk given as a tuple of buffers is one DATA frame: small, large, with a small head, empty parts."""
    server, client = await make_transport(), await make_transport()

    async def collect(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        got.extend([bytes(c) async for c in chunks])
        return Echo(number=len(got)), None

    got: list[bytes] = []
    rng = random.Random(7)
    tuples = [
        (b"head", b"", b"tail"),  # fits one record
        (rng.randbytes(64), memoryview(rng.randbytes(300_000))),  # a head that shares the header's record
        (rng.randbytes(70_000), bytearray(rng.randbytes(65_000)), rng.randbytes(1)),  # record-sized pieces
        (b"",),
    ]

    async def send() -> AsyncIterator[tuple[bytes | bytearray | memoryview, ...]]:
        for t in tuples:
            yield t

    server.register_stream("test.collect", Echo, collect)
    async with asyncio.timeout(10):
        async with client.open_stream(server.listen_maddrs[0], "test.collect", Echo(), Echo, chunks=send()) as s:
            assert s.reply.number == len(tuples)
    assert got == [b"".join(bytes(b) for b in t) for t in tuples]


async def test_a_reply_racing_the_callers_cancellation_is_dropped_not_a_protocol_error(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A lookup cancels its pending calls once it has its answer; a reply already being processed in that loop
    turn finds the call's future cancelled but its stream not yet dropped. That reply is late, not a second
    reply: the connection stays up, and the cancelled call resets the stream so the handler stops."""
    server, client = await make_transport(), await make_transport()
    started, stopped = asyncio.Event(), asyncio.Event()

    async def slow(ctx: RpcContext, request: Echo) -> Echo:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()
        return Echo()

    server.register("test.slow", Echo, slow)
    server.register("test.echo", Echo, _echo)
    async with asyncio.timeout(10):
        task = asyncio.create_task(client.call(server.listen_maddrs[0], "test.slow", Echo(), Echo))
        await started.wait()
        (conn,) = client._table.by_peer[server.peer_id]
        (stream_id,) = conn.streams
        task.cancel()  # cancels the reply future now; the call's `finally` runs at the task's next turn
        conn._on_frame(Frame(stream_id, FrameType.REPLY, 0, packb(Echo().to_wire())))  # the reply, this turn
        await asyncio.gather(task, return_exceptions=True)
        await stopped.wait()  # the RESET reached the handler
        assert conn.is_open and "unexpected REPLY" not in caplog.text
        assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(number=1), Echo)).number == 2


async def test_stream_without_chunks_and_unary_reply(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def count(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        return Echo(number=sum([len(c) async for c in chunks])), None

    server.register_stream("test.count", Echo, count)
    async with asyncio.timeout(10):
        async with client.open_stream(server.listen_maddrs[0], "test.count", Echo(), Echo) as s:
            assert s.reply.number == 0 and [c async for c in s.chunks()] == []
        async with client.open_stream(
            server.listen_maddrs[0], "test.count", Echo(), Echo, chunks=_chunks(1000, 10)
        ) as s:
            assert s.reply.number == 1000


async def test_flow_control_bounds_the_receiver_buffer(make_transport: MakeTransport) -> None:
    window = 512 * 1024
    server = await make_transport(stream_window_bytes=window)
    client = await make_transport()
    produced = 0
    first_chunk = asyncio.Event()
    resume = asyncio.Event()

    async def slow_reader(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        total = 0
        async for chunk in chunks:
            total += len(chunk)
            first_chunk.set()
            await resume.wait()
        return Echo(number=total), None

    async def producer() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(64):
            produced += 64 * 1024
            yield b"\0" * (64 * 1024)

    server.register_stream("test.slow", Echo, slow_reader)

    async def upload() -> int:
        async with client.open_stream(server.listen_maddrs[0], "test.slow", Echo(), Echo, chunks=producer()) as s:
            return s.reply.number

    async with asyncio.timeout(30):
        task = asyncio.create_task(upload())
        await first_chunk.wait()
        stalled_at = await _wait_stalled(lambda: produced)
        assert stalled_at <= window + 2 * 64 * 1024  # the sender waits for credit instead of filling memory
        resume.set()
        assert await task == 64 * 64 * 1024


async def _wait_stalled(read: Callable[[], int]) -> int:
    last, stable = -1, 0
    for _ in range(200):  # bounded: until the producer stops advancing for 5 polls
        value = read()
        if value == last:
            stable += 1
            if stable >= 5:
                return value
        else:
            stable, last = 0, value
        await asyncio.sleep(0.01)
    return last


async def test_failing_upload_iterator_aborts_the_stream(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def drain(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        async for _ in chunks:
            pass
        return Echo(), None

    async def broken() -> AsyncIterator[bytes]:
        yield b"x"
        raise ValueError("disk read failed")

    server.register_stream("test.drain", Echo, drain)
    server.register("test.echo", Echo, _echo)
    async with asyncio.timeout(10):
        with pytest.raises((TransportError, RemoteError), match=r"disk read failed|reset"):
            async with client.open_stream(server.listen_maddrs[0], "test.drain", Echo(), Echo, chunks=broken()):
                pass
        assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(number=1), Echo)).number == 2


async def test_idle_connections_close_and_reconnect(make_transport: MakeTransport) -> None:
    server = await make_transport(idle_timeout_s=0.5)
    client = await make_transport()
    server.register("test.echo", Echo, _echo)
    gone = asyncio.Event()
    client.on_peer_disconnected(lambda peer, addr: gone.set())
    async with asyncio.timeout(10):
        await client.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        await gone.wait()
        assert client.connected_peers() == []
        assert (
            await client.call(server.peer_id, "test.echo", Echo(number=2), Echo)
        ).number == 3  # redials from the book


async def test_callbacks_disconnect_and_ping(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    seen: list[object] = []
    server.on_peer_connected(lambda peer, addr: seen.append((peer, addr.host)))
    async with asyncio.timeout(10):
        assert await client.connect(server.listen_maddrs[0]) == server.peer_id
        assert await client.ping(server.peer_id) > 0
        assert seen == [(client.peer_id, "127.0.0.1")]
        await client.disconnect(server.peer_id)
        assert client.connected_peers() == []


async def test_simultaneous_dials_are_safe(make_transport: MakeTransport) -> None:
    a, b = await make_transport("a"), await make_transport("b")
    for t in (a, b):
        t.register("test.echo", Echo, _echo)
    a.add_addresses(b.peer_id, [parse_maddr(b.listen_maddrs[0])])
    b.add_addresses(a.peer_id, [parse_maddr(a.listen_maddrs[0])])
    async with asyncio.timeout(10):
        for _ in range(3):
            r1, r2 = await asyncio.gather(
                a.call(b.peer_id, "test.echo", Echo(number=1), Echo),
                b.call(a.peer_id, "test.echo", Echo(number=2), Echo),
            )
            assert (r1.number, r2.number) == (2, 3)
    assert len(a._table.all) <= 2 and len(b._table.all) <= 2
    # both ends use the same connection (one TCP flow), even when both dials survived
    ca, cb = a._table.open_connection(b.peer_id), b._table.open_connection(a.peer_id)
    assert ca is not None and cb is not None and ca.initiator != cb.initiator


def test_both_ends_pick_the_connection_dialled_by_the_smaller_peer() -> None:
    first, second = sorted(seeded_identity(name).peer_id for name in ("a", "b"))
    for local, remote in ((first, second), (second, first)):
        table = ConnectionTable(local)

        def chosen(conns: list[SimpleNamespace], table: ConnectionTable = table, remote: PeerID = remote) -> object:
            table.by_peer[remote] = cast(list[Connection], conns)
            return table.open_connection(remote)

        inbound = SimpleNamespace(is_open=True, initiator=False, relayed=False)
        outbound = SimpleNamespace(is_open=True, initiator=True, relayed=False)
        for order in ([inbound, outbound], [outbound, inbound]):
            assert chosen(order) is (outbound if local == first else inbound)
        outbound.is_open = False  # the preferred one closed: the other still serves
        assert chosen([outbound, inbound]) is inbound
        outbound.is_open, inbound.relayed = True, True  # a direct connection goes before a relayed one
        assert chosen([outbound, inbound]) is outbound
        outbound.relayed, inbound.relayed = True, False
        assert chosen([outbound, inbound]) is inbound


async def test_register_and_config_errors(make_transport: MakeTransport) -> None:
    t = await make_transport()
    t.register("test.echo", Echo, _echo)
    with pytest.raises(ConfigError, match="already registered"):
        t.register("test.echo", Echo, _echo)
    with pytest.raises(ConfigError, match="listen_maddrs"):
        await make_transport(listen_maddrs=("/ip4/127.0.0.1/udp/1",))
    with pytest.raises(ConfigError, match="rpc_timeout_s"):
        await make_transport(rpc_timeout_s=0)
    with pytest.raises(ConfigError, match="max_message_size_bytes"):
        await make_transport(max_message_size_bytes=1 << 40)
    taken = parse_maddr(t.listen_maddrs[0])
    with pytest.raises(ConfigError, match="cannot listen on"):
        await make_transport(listen_maddrs=(f"/ip4/127.0.0.1/tcp/{taken.port}",))


async def test_not_started_transport_refuses_calls() -> None:
    t = Transport(seeded_identity("x"), TransportConfig())
    with pytest.raises(TransportError, match="not running"):
        await t.call("/ip4/127.0.0.1/tcp/1", "x", Echo(), Echo)
