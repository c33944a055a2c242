"""`TransportConfig.emulated_delay_s`: every write reaches the socket that much later, in order (swarm/p2p/delay.py)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from swarm.p2p import RpcContext
from tests.transport.conftest import Echo, MakeTransport

DELAY_S = 0.02


async def test_a_round_trip_costs_twice_the_delay(make_transport: MakeTransport) -> None:
    server = await make_transport(emulated_delay_s=DELAY_S)
    client = await make_transport(emulated_delay_s=DELAY_S)

    async def echo(ctx: RpcContext, request: Echo) -> Echo:
        return request

    server.register("test.echo", Echo, echo)
    async with asyncio.timeout(10):
        await client.connect(server.listen_maddrs[0])
        rtts = []
        for i in range(5):
            started = time.monotonic()
            assert await client.call(server.peer_id, "test.echo", Echo(number=i), Echo) == Echo(number=i)
            rtts.append(time.monotonic() - started)
        pings = [await client.ping(server.peer_id) for _ in range(3)]
    assert min(rtts) >= 2 * DELAY_S and min(pings) >= 2 * DELAY_S
    assert sorted(rtts)[2] < 2 * DELAY_S + 0.5  # delayed, not stalled (generous: a loaded CI machine)


async def test_delayed_frames_keep_their_order_and_bytes(make_transport: MakeTransport) -> None:
    """Many chunks of a stream, written back to back through the delay: all arrive, in order, unchanged."""
    server = await make_transport(emulated_delay_s=DELAY_S)
    client = await make_transport(emulated_delay_s=DELAY_S)
    rng = random.Random(3)
    chunks = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(40)]
    got: list[bytes] = []

    async def collect(ctx: RpcContext, request: Echo, incoming: AsyncIterator[bytes]) -> tuple[Echo, None]:
        async for chunk in incoming:
            got.append(bytes(chunk))
        return Echo(number=len(got)), None

    async def send() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    server.register_stream("test.collect", Echo, collect)
    async with asyncio.timeout(20):
        async with client.open_stream(server.listen_maddrs[0], "test.collect", Echo(), Echo, chunks=send()) as s:
            assert s.reply.number == len(chunks)
    assert got == chunks


async def test_no_delay_by_default(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    async with asyncio.timeout(10):
        await client.connect(server.listen_maddrs[0])
        pings = [await client.ping(server.peer_id) for _ in range(3)]
    assert min(pings) < DELAY_S
