"""Mirrored rounds (two members send each other everything): same bits on both, half a round trip, faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
import torch

from swarm.averaging.allreduce import AllReduceOutcome, AllReduceServer, Group, run_allreduce
from swarm.averaging.config import AveragerConfig
from swarm.averaging.messages import PartAck, PartHeader
from swarm.averaging.mirrored import is_mirrored, reduce_pair
from swarm.averaging.partition import flatten_tensors
from swarm.averaging.reducer import ReductionConfig
from swarm.averaging.wire import CompressionPartCodec
from swarm.errors import SwarmError
from swarm.p2p import Transport
from tests.averaging.conftest import fixed_groups, random_tensors, transports, weighted_mean

SHAPES = [(37, 11), (1001,), (3,)]  # 1411 values, cut into parts of 1024


def _servers(ts: Sequence[Transport], codec: str = "none", **kw: object) -> list[AllReduceServer]:
    base: dict[str, object] = {"part_size_bytes": 4096, "allreduce_timeout_s": 20.0, "part_timeout_s": 2.0}
    base.update(kw)
    cfg = AveragerConfig(codec=codec, **base)  # type: ignore[arg-type]
    servers = [AllReduceServer(cfg, t, CompressionPartCodec(codec)) for t in ts]
    for s in servers:
        s.register()
    return servers


async def _run(
    servers: Sequence[AllReduceServer],
    groups: Sequence[Group],
    flats: Sequence[torch.Tensor],
    weights: Sequence[float],
    exclude: Sequence[Sequence[object]] = ((), ()),
) -> list[AllReduceOutcome]:
    for s, g in zip(servers, groups, strict=True):
        s.expect(g.group_key, g.round_id)
    async with asyncio.timeout(30):
        return list(
            await asyncio.gather(
                *(
                    run_allreduce(s, g, f, w, exclude=x)  # type: ignore[arg-type]
                    for s, g, f, w, x in zip(servers, groups, flats, weights, exclude, strict=True)
                )
            )
        )


def _flats(seed: int) -> list[torch.Tensor]:
    return [flatten_tensors(random_tensors(seed + i, SHAPES)) for i in range(2)]


def test_only_two_full_members_mirror() -> None:
    class _T:
        def __init__(self, i: int) -> None:
            from tests.averaging.conftest import identity

            self.peer_id = identity(i).peer_id
            self.listen_maddrs = ("/ip4/127.0.0.1/tcp/1",)

    two = fixed_groups([_T(0), _T(1)], "run/avg/0/1")  # type: ignore[list-item]
    assert is_mirrored(two[0])
    assert not is_mirrored(fixed_groups([_T(0), _T(1)], "run/avg/0/1", client_mode=[True, False])[0])  # type: ignore[list-item]
    assert not is_mirrored(fixed_groups([_T(0), _T(1), _T(2)], "run/avg/0/1")[0])  # type: ignore[list-item]


@pytest.mark.parametrize("codec", ["none", "blockwise8"])
async def test_both_members_end_with_the_same_bits(codec: str) -> None:
    weights = [3.0, 5.0]
    flats = _flats(10)
    expected = weighted_mean(flats, weights)
    async with transports(2) as ts:
        servers = _servers(ts, codec)
        for t in ts:  # a mirrored round fetches no result: with avg.result gone it still averages
            t.unregister("avg.result")
        outcomes = await _run(servers, fixed_groups(ts, "run/avg/0/1"), flats, weights)
    for outcome in outcomes:
        assert outcome.lost_owners == () and outcome.dropped_senders == ()
    assert torch.equal(flats[0], flats[1])
    tolerance = 1e-6 if codec == "none" else 5e-2
    torch.testing.assert_close(flats[0].double(), expected, rtol=0, atol=tolerance)


async def test_centered_clip_gives_the_same_bits_and_inspects_both_members() -> None:
    flats = _flats(20)
    async with transports(2) as ts:
        servers = _servers(ts, reduction="centered_clip", clip_tau=0.5, inspect_parts=2)
        outcomes = await _run(servers, fixed_groups(ts, "run/avg/0/2"), flats, [1.0, 2.0])
    assert torch.equal(flats[0], flats[1])
    for outcome in outcomes:
        assert [(p.start, p.end) for p in outcome.inspected] == [(0, 1024), (1024, 1411)]
        assert len(outcome.inspected[0].values) == 2


def test_reduce_pair_is_order_exact_and_keeps_a_lone_value() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    cfg = ReductionConfig()
    out = reduce_pair([a, b], [3.0, 7.0], cfg)
    assert torch.equal(out, (a * 3.0 + b * 7.0) / 10.0)
    assert torch.equal(reduce_pair([a], [3.0], cfg), a)


async def test_a_peer_that_never_sends_is_left_out_within_the_part_timeout() -> None:
    flats = _flats(30)
    mine = flats[0].clone()
    async with transports(2) as ts:
        servers = _servers(ts, part_timeout_s=0.5)
        groups = fixed_groups(ts, "run/avg/0/3")
        servers[0].expect(groups[0].group_key, groups[0].round_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):
            outcome = await run_allreduce(servers[0], groups[0], flats[0], 1.0)  # the peer never runs its round
        assert loop.time() - started < 5.0
    assert outcome.dropped_senders == (groups[0].peer(1),)
    assert torch.equal(flats[0], mine)  # the peer refused ours too: nothing to average with


async def test_an_excluded_peer_is_refused_and_both_end_with_the_excluding_members_values() -> None:
    flats = _flats(40)
    first = flats[0].clone()
    async with transports(2) as ts:
        servers = _servers(ts)
        groups = fixed_groups(ts, "run/avg/0/4")
        outcomes = await _run(servers, groups, flats, [1.0, 1.0], exclude=[[groups[0].peer(1)], []])
    assert outcomes[0].excluded == (groups[0].peer(1),) and outcomes[0].dropped_senders == ()
    assert outcomes[1].lost_owners == (groups[1].peer(0),)  # its vector was refused: the result leaves it out
    assert torch.equal(flats[0], first) and torch.equal(flats[1], first)


async def test_a_garbage_vector_is_dropped_and_the_server_keeps_serving() -> None:
    flats = _flats(50)
    mine = flats[0].clone()
    async with transports(2) as ts:
        servers = _servers(ts)
        groups = fixed_groups(ts, "run/avg/0/5")
        servers[0].expect(groups[0].group_key, groups[0].round_id)

        async def garbage() -> AsyncIterator[bytes]:
            yield b"\x00not a tensor"

        async def cheat() -> None:
            header = PartHeader(group_key=groups[1].group_key, round_id=groups[1].round_id, weight=1.0)
            try:
                async with ts[1].open_stream(ts[0].peer_id, "avg.part", header, PartAck, chunks=garbage()):
                    pass
            except (SwarmError, OSError):  # the owner answers garbage with an error: that is the point
                pass

        async with asyncio.timeout(10):
            outcome, _ = await asyncio.gather(run_allreduce(servers[0], groups[0], flats[0], 1.0), cheat())
        assert outcome.dropped_senders == (groups[0].peer(1),)
        assert torch.equal(flats[0], mine)
        again = _flats(60)  # a fresh round on the same servers still averages
        outcomes = await _run(servers, fixed_groups(ts, "run/avg/0/6"), again, [1.0, 1.0])
    assert all(o.dropped_senders == () for o in outcomes) and torch.equal(again[0], again[1])
