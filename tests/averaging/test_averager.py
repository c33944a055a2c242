"""Averager.step end to end: matchmaking through the real DHT, then the all-reduce, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import torch

from swarm.dht import DHT, DHTConfig
from swarm.dht.keys import owner_subkey
from swarm.averaging import Averager, AveragerConfig, AveragingResult
from swarm.averaging.partition import flatten_tensors
from swarm.errors import SwarmError
from tests.averaging.conftest import random_tensors, transports, weighted_mean

SHAPES = [(13, 7), (501,)]


def _config(**kw: object) -> AveragerConfig:
    base: dict[str, object] = {
        "target_group_size": 4,
        "min_group_size": 2,
        "matchmaking_time_s": 3.0,
        "join_timeout_s": 3.0,
        "allreduce_timeout_s": 10.0,
        "part_timeout_s": 3.0,
        "part_size_bytes": 4096,
        "poll_interval_s": 0.1,
    }
    base.update(kw)
    return AveragerConfig(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def swarm(n: int, cfg: AveragerConfig, *, salt: int = 0) -> AsyncIterator[list[Averager]]:
    """``n`` peers, each a transport + DHT (bootstrapped from peer 0) + averager; all stopped on exit."""
    async with transports(n, salt=salt) as ts, contextlib.AsyncExitStack() as stack:
        dhts = []
        for i, t in enumerate(ts):
            initial = () if i == 0 else tuple(ts[0].listen_maddrs)
            dhts.append(await stack.enter_async_context(DHT.create(DHTConfig(initial_peers=initial), transport=t)))
        yield [Averager(cfg, transport=t, dht=d) for t, d in zip(ts, dhts, strict=False)]


async def _steps(
    averagers: Sequence[Averager],
    tensors: Sequence[list[torch.Tensor]],
    weights: Sequence[float],
    keys: Sequence[str],
    **kw: object,
) -> list[AveragingResult]:
    async with asyncio.timeout(60):
        return list(
            await asyncio.gather(
                *(
                    a.step(t, weight=w, group_key=k, **kw)
                    for a, t, w, k in zip(averagers, tensors, weights, keys, strict=False)  # type: ignore[arg-type]
                )
            )
        )


async def test_four_peers_match_through_the_dht_and_hold_the_weighted_mean() -> None:
    tensors = [random_tensors(10 + i, SHAPES) for i in range(4)]
    weights = [3.0, 1.0, 7.0, 2.0]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], weights)
    async with swarm(4, _config()) as averagers:
        results = await _steps(averagers, tensors, weights, ["run/avg/0/1"] * 4)
    assert all(r.with_others and r.group_size == 4 and r.lost_peers == () for r in results)
    assert len({r.round_id for r in results}) == 1 and len({r.group for r in results}) == 1
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_two_groups_under_different_keys_never_mix() -> None:
    tensors = [random_tensors(20 + i, SHAPES) for i in range(4)]
    flats = [flatten_tensors(t) for t in tensors]
    weights = [1.0, 2.0, 3.0, 4.0]
    keys = ["run/avg/0/7", "run/avg/0/8", "run/avg/0/7", "run/avg/0/8"]
    expected = {
        "run/avg/0/7": weighted_mean([flats[0], flats[2]], [1.0, 3.0]),
        "run/avg/0/8": weighted_mean([flats[1], flats[3]], [2.0, 4.0]),
    }
    async with swarm(4, _config(), salt=1) as averagers:  # config target 4; per call: 2
        results = await _steps(averagers, tensors, weights, keys, target_group_size=2)
    for t, r, k in zip(tensors, results, keys, strict=False):
        assert r.with_others and r.group_size == 2
        torch.testing.assert_close(flatten_tensors(t).double(), expected[k], rtol=1e-6, atol=1e-6)


async def test_a_lone_peer_averages_alone_and_keeps_its_values() -> None:
    tensors = random_tensors(30, SHAPES)
    before = [t.clone() for t in tensors]
    async with swarm(1, _config(matchmaking_time_s=0.3)) as (averager,):
        result = await averager.step(tensors, weight=1.0, group_key="run/avg/0/1")
    assert not result.with_others and result.group_size == 1
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=False))


async def test_group_below_min_size_averages_alone() -> None:
    tensors = [random_tensors(40 + i, SHAPES) for i in range(2)]
    before = [[t.clone() for t in ts] for ts in tensors]
    async with swarm(2, _config(min_group_size=3, target_group_size=3, matchmaking_time_s=1.0), salt=2) as avgs:
        results = await _steps(avgs, tensors, [1.0, 1.0], ["k/avg/0/1"] * 2)
    assert [r.with_others for r in results] == [False, False]
    for ts, bs in zip(tensors, before, strict=False):
        assert all(torch.equal(a, b) for a, b in zip(ts, bs, strict=False))


async def test_malformed_matchmaking_entries_are_skipped() -> None:
    """A peer that stores garbage under the key (its own, signed subkey) is ignored by the others."""
    tensors = [random_tensors(50 + i, SHAPES) for i in range(2)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 1.0])
    async with swarm(3, _config(target_group_size=3, matchmaking_time_s=1.5), salt=3) as averagers:
        bad = averagers[2]
        await bad.matchmaker.dht.store(
            "run/avg/0/1", {"ready_at": "soon"}, time.time() + 60.0, subkey=owner_subkey(bad.transport.peer_id)
        )
        results = await _steps(averagers[:2], tensors, [1.0, 1.0], ["run/avg/0/1"] * 2)
    assert all(r.with_others and r.group_size == 2 for r in results)
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_bad_calls_raise() -> None:
    async with swarm(1, _config()) as (averager,):
        with pytest.raises(SwarmError, match="weight"):
            await averager.step(random_tensors(0, SHAPES), weight=0.0, group_key="k")
        with pytest.raises(SwarmError, match="at least one tensor"):
            await averager.step([], weight=1.0, group_key="k")
        with pytest.raises(SwarmError, match="target_group_size"):
            await averager.step(random_tensors(0, SHAPES), weight=1.0, group_key="k", target_group_size=0)


async def test_peers_avoided_by_everyone_else_are_never_grouped_with() -> None:
    """Peers 0-2 avoid and exclude peer 3 (a quorum reported it): they average among themselves and hold the
    mean of their own values; peer 3 ends up alone with its values unchanged, whatever its rank."""
    tensors = [random_tensors(60 + i, SHAPES) for i in range(4)]
    originals = [flatten_tensors(t).clone() for t in tensors]
    weights = [1.0, 2.0, 3.0, 4.0]
    async with swarm(4, _config(), salt=7) as averagers:
        cheater = averagers[3].transport.peer_id
        async with asyncio.timeout(60):
            results = await asyncio.gather(
                *(
                    a.step(
                        t, weight=w, group_key="run/avg/0/9", exclude={cheater}, avoid={cheater}, target_group_size=3
                    )
                    for a, t, w in zip(averagers[:3], tensors[:3], weights[:3], strict=False)
                ),
                averagers[3].step(tensors[3], weight=weights[3], group_key="run/avg/0/9", target_group_size=4),
            )
    honest_mean = weighted_mean(originals[:3], weights[:3])
    for r, t in zip(results[:3], tensors[:3], strict=False):
        assert r.with_others and cheater not in r.group
        torch.testing.assert_close(flatten_tensors(t).double(), honest_mean, rtol=1e-6, atol=1e-6)
    assert not results[3].with_others
    torch.testing.assert_close(flatten_tensors(tensors[3]), originals[3])
