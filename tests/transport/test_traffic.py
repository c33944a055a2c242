"""Bytes per RPC method family: counted on both sides, equal on both sides, and at least the payload sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from swarm.p2p import RpcContext
from swarm.p2p.traffic import OTHER_FAMILY, TrafficSnapshot, method_family
from tests.transport.conftest import Echo, MakeTransport

PAYLOAD_BYTES = 3_000_000


def test_method_family_is_the_first_dotted_part() -> None:
    assert method_family("stage.forward") == "stage"
    assert method_family("avg.join") == "avg"
    assert method_family("ping") == "ping"
    assert method_family("?") == OTHER_FAMILY and method_family("") == OTHER_FAMILY


def test_snapshot_difference_keeps_only_families_that_moved() -> None:
    a = TrafficSnapshot({"stage": 10, "dht": 5}, {"stage": 1})
    b = TrafficSnapshot({"stage": 25, "dht": 5, "avg": 7}, {"stage": 4})
    d = b.minus(a)
    assert d.sent_bytes == {"stage": 15, "avg": 7} and d.received_bytes == {"stage": 3}
    assert d.total_sent_bytes == 22 and d.total_received_bytes == 3


async def test_each_side_counts_what_the_other_sent_per_family(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def echo(ctx: RpcContext, request: Echo) -> Echo:
        return Echo(text=request.text)

    async def sink(ctx: RpcContext, header: Echo, chunks: AsyncIterator[bytes]) -> tuple[Echo, None]:
        return Echo(number=sum([len(c) async for c in chunks])), None

    server.register("alpha.echo", Echo, echo)
    server.register_stream("beta.sink", Echo, sink)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(PAYLOAD_BYTES // 100_000):
            yield b"x" * 100_000

    async with asyncio.timeout(30):
        await client.call(server.listen_maddrs[0], "alpha.echo", Echo(text="y" * 10_000), Echo)
        before_c, before_s = client.traffic.snapshot(), server.traffic.snapshot()
        async with client.open_stream(server.peer_id, "beta.sink", Echo(), Echo, chunks=upload()) as s:
            assert s.reply.number == PAYLOAD_BYTES
        await client.call(server.peer_id, "alpha.echo", Echo(text="z" * 50_000), Echo)
    sent_c, got_s = client.traffic.snapshot().minus(before_c), server.traffic.snapshot().minus(before_s)
    # the payloads, plus framing and encryption overhead of well under 1%
    assert PAYLOAD_BYTES <= sent_c.sent_bytes["beta"] < PAYLOAD_BYTES * 1.01
    assert 100_000 <= sent_c.sent_bytes["alpha"] + sent_c.received_bytes["alpha"] < 101_000 + 2_000
    # each side's count of a direction is the other side's count of it, byte for byte
    assert got_s.received_bytes["beta"] == sent_c.sent_bytes["beta"]
    assert got_s.sent_bytes["beta"] == sent_c.received_bytes["beta"]
    assert got_s.received_bytes["alpha"] == sent_c.sent_bytes["alpha"]
    assert got_s.sent_bytes["alpha"] == sent_c.received_bytes["alpha"]
    assert "other" not in sent_c.sent_bytes and "other" not in got_s.received_bytes
    # each family here has one method: its per-method count is the family's
    assert sent_c.sent_by_method == {"alpha.echo": sent_c.sent_bytes["alpha"], "beta.sink": sent_c.sent_bytes["beta"]}
    assert got_s.received_by_method["beta.sink"] == sent_c.sent_by_method["beta.sink"]


def test_methods_of_one_family_are_also_counted_apart() -> None:
    a = TrafficSnapshot({"stage": 10}, {}, {"stage.forward": 6, "stage.tied": 4}, {})
    b = TrafficSnapshot({"stage": 30}, {}, {"stage.forward": 26, "stage.tied": 4}, {"stage.tied": 3})
    diff = b.minus(a)
    assert diff.sent_by_method == {"stage.forward": 20} and diff.received_by_method == {"stage.tied": 3}
    assert diff.to_dict()["sent_by_method"] == {"stage.forward": 20}
