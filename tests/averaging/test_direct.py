"""Direct matchmaking among expected peers (`swarm.averaging.direct`), and the withdrawal off the step's path."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from swarm.averaging import Averager, AveragerConfig
from swarm.averaging.direct import ANNOUNCE_METHOD
from swarm.averaging.messages import GROUP_SCHEMA, AnnounceReply, AnnounceRequest, GroupWithdrawal
from swarm.averaging.partition import flatten_tensors
from swarm.dht import DHT, DHTConfig
from swarm.errors import RemoteError
from swarm.p2p import Transport
from tests.averaging.conftest import random_tensors, transports, weighted_mean

SHAPES = [(23, 7), (129,)]


def _config(**kw: object) -> AveragerConfig:
    base: dict[str, object] = {
        "target_group_size": 3,
        "matchmaking_time_s": 2.0,
        "join_timeout_s": 3.0,
        "allreduce_timeout_s": 10.0,
        "part_timeout_s": 3.0,
        "part_size_bytes": 4096,
        "poll_interval_s": 0.05,
    }
    base.update(kw)
    return AveragerConfig(**base)  # type: ignore[arg-type]


class CountingDHT:
    """A real DHT whose stores and gets are counted, and whose withdrawal stores can be held back (``hold``)."""

    def __init__(self, dht: DHT) -> None:
        self.dht = dht
        self.stores = 0
        self.gets = 0
        self.hold: asyncio.Event | None = None
        self.withdrawn = asyncio.Event()

    async def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        self.stores += 1
        if isinstance(value, dict) and value.get("closed") and self.hold is not None:
            await self.hold.wait()
        result = await self.dht.store(key, value, expiration_time, subkey=subkey)
        if isinstance(value, dict) and value.get("closed"):
            self.withdrawn.set()
        return result

    async def get(self, key: str, latest: bool = False) -> Any:
        self.gets += 1
        return await self.dht.get(key, latest=latest)


@contextlib.asynccontextmanager
async def swarm(n: int, cfg: AveragerConfig, *, salt: int) -> AsyncIterator[tuple[list[Transport], list[Any]]]:
    async with transports(n, salt=salt) as ts, contextlib.AsyncExitStack() as stack:
        dhts = []
        for i, t in enumerate(ts):
            initial = () if i == 0 else tuple(ts[0].listen_maddrs)
            dht = await stack.enter_async_context(DHT.create(DHTConfig(initial_peers=initial), transport=t))
            dhts.append(CountingDHT(dht))
        avgs = [Averager(cfg, transport=t, dht=d) for t, d in zip(ts, dhts, strict=True)]
        try:
            yield ts, [(a, d) for a, d in zip(avgs, dhts, strict=True)]
        finally:
            for a in avgs:
                a.unregister()


async def test_expected_peers_agree_directly_without_touching_the_dht() -> None:
    tensors = [random_tensors(10 + i, SHAPES) for i in range(3)]
    weights = [1.0, 2.0, 3.0]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], weights)
    async with swarm(3, _config(), salt=31) as (ts, pairs), asyncio.timeout(30):
        peers = [t.peer_id for t in ts]
        results = await asyncio.gather(
            *(
                a.step(t, weight=w, group_key="run/avg/0/1", expected=[p for p in peers if p != a.transport.peer_id])
                for (a, _), t, w in zip(pairs, tensors, weights, strict=True)
            )
        )
        assert all(d.stores == 0 and d.gets == 0 for _, d in pairs)  # no DHT round trip at all
    assert all(r.with_others and r.group_size == 3 for r in results)
    assert len({r.round_id for r in results}) == 1
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_differing_expectations_fall_back_to_the_dht_and_still_average() -> None:
    """Peer 2 also expects peer 3 (which does not average now) while peers 0 and 1 expect the three of them: each
    sees another expectation and goes through the DHT, where the three group."""
    tensors = [random_tensors(20 + i, SHAPES) for i in range(3)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 1.0, 1.0])
    async with swarm(4, _config(), salt=32) as (ts, pairs), asyncio.timeout(60):
        peers = [t.peer_id for t in ts]
        views = [[peers[1], peers[2]], [peers[0], peers[2]], [peers[0], peers[1], peers[3]]]
        results = await asyncio.gather(
            *(
                a.step(t, weight=1.0, group_key="run/avg/1/1", expected=view)
                for (a, _), t, view in zip(pairs, tensors, views, strict=False)
            )
        )
        assert all(d.stores > 0 for _, d in pairs[:3])  # every one went through the DHT
    assert all(r.with_others and r.group_size == 3 for r in results)
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_the_step_does_not_wait_for_the_withdrawal() -> None:
    """Through the DHT (no expected peers), the withdrawal of each entry is held back: both steps still return with
    the average; the withdrawals land afterwards (`Matchmaker.settled`)."""
    tensors = [random_tensors(30 + i, SHAPES) for i in range(2)]
    async with swarm(2, _config(target_group_size=2), salt=33) as (_, pairs), asyncio.timeout(30):
        for _, d in pairs:
            d.hold = asyncio.Event()
        results = await asyncio.gather(
            *(a.step(t, weight=1.0, group_key="run/avg/0/7") for (a, _), t in zip(pairs, tensors, strict=True))
        )
        assert all(r.with_others for r in results)
        assert not any(d.withdrawn.is_set() for _, d in pairs)  # still held back: the step did not wait for it
        for a, d in pairs:
            assert d.hold is not None
            d.hold.set()
            await a.matchmaker.settled()
            assert d.withdrawn.is_set()
        found = await pairs[0][1].dht.get("run/avg/0/7", latest=True)
        entries = list(GROUP_SCHEMA.entries(found))
        assert len(entries) == 2 and all(isinstance(e.value, GroupWithdrawal) for e in entries)


@pytest.mark.slow
async def test_a_missing_expected_peer_is_not_waited_for_twice() -> None:
    """Peers 0 and 1 expect peer 2 too, which never averages: after ``matchmaking_time_s`` without its announcement
    they group through the DHT looking only for each other (not gathering another full window for peer 2)."""
    tensors = [random_tensors(40 + i, SHAPES) for i in range(2)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 1.0])
    async with swarm(3, _config(matchmaking_time_s=4.0), salt=34) as (ts, pairs), asyncio.timeout(30):
        peers = [t.peer_id for t in ts]
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(
                a.step(t, weight=1.0, group_key="run/avg/0/3", expected=[p for p in peers if p != a.transport.peer_id])
                for (a, _), t in zip(pairs[:2], tensors, strict=True)
            )
        )
        elapsed = loop.time() - started
    assert all(r.with_others and r.group_size == 2 for r in results)
    assert 4.0 <= elapsed < 7.5  # one window for the direct try, then no second one (that would be >= 8 s)
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_an_announcement_of_another_peers_entry_is_refused() -> None:
    async with swarm(3, _config(), salt=35) as (ts, pairs), asyncio.timeout(20):
        forged = pairs[2][0].matchmaker.my_info(1.0)  # peer 2's entry, sent by peer 0
        request = AnnounceRequest(
            group_key="run/avg/0/5", member=forged, expected=tuple(sorted(t.peer_id.to_bytes() for t in ts))
        )
        with pytest.raises(RemoteError, match="own entry"):
            await ts[0].call(ts[1].peer_id, ANNOUNCE_METHOD, request, AnnounceReply)
        assert "run/avg/0/5" not in pairs[1][0].direct._announced


async def test_a_late_peer_does_not_group_with_a_peer_that_gave_up_on_it() -> None:
    """Peer 0 waits for peer 1 in vain and averages alone; peer 1 comes later under the same key (it was catching
    up) and holds peer 0's old announcement: it must not form a group with peer 0, which left the key."""
    tensors = [random_tensors(50 + i, SHAPES) for i in range(2)]
    async with swarm(2, _config(matchmaking_time_s=1.0, target_group_size=2), salt=36) as (ts, pairs):
        async with asyncio.timeout(30):
            (a, _), (b, _) = pairs
            first = await a.step(tensors[0], weight=1.0, group_key="run/avg/0/8", expected=[ts[1].peer_id])
            assert not first.with_others and first.group_size == 1
            assert "run/avg/0/8" in b.direct._announced  # peer 0's announcement, kept for a try that never came
            late = await b.step(tensors[1], weight=1.0, group_key="run/avg/0/8", expected=[ts[0].peer_id])
    assert not late.with_others and late.group_size == 1  # not a group of two whose other member is gone


async def test_entries_announced_ahead_form_the_group_with_no_announcement_at_the_close() -> None:
    """Both peers announce their entries ahead (their step still open); then nobody can announce any more (the
    handlers are gone): the group still forms from the entries announced ahead, though peer 1 gets ready 0.3 s after
    peer 0 already streams to it (its server held the parts), and both average."""
    tensors = [random_tensors(60 + i, SHAPES) for i in range(2)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 3.0])
    key = "run/avg/0/9"
    async with swarm(2, _config(target_group_size=2), salt=37) as (ts, pairs), asyncio.timeout(30):
        (a, _), (b, _) = pairs
        a.announce_ahead(key, expected=[ts[1].peer_id])
        b.announce_ahead(key, expected=[ts[0].peer_id])
        while not (key in a.direct._announced and key in b.direct._announced):
            await asyncio.sleep(0.01)
        for t in ts:
            t.unregister(ANNOUNCE_METHOD)

        async def late() -> Any:
            await asyncio.sleep(0.3)
            return await b.step(tensors[1], weight=3.0, group_key=key, expected=[ts[0].peer_id])

        results = await asyncio.gather(a.step(tensors[0], weight=1.0, group_key=key, expected=[ts[1].peer_id]), late())
    assert all(r.with_others and r.group_size == 2 for r in results)
    assert len({r.round_id for r in results}) == 1
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)
