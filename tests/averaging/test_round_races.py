"""Regression tests of protocol-level stalls seen with 3 peers per stage (6-node runs).

- A follower that got the leader's ``avg.begin`` first streams to a fellow follower whose begin is still on its
  way: that member must wait for its begin (bounded), not reject the round (which cost the round
  ``part_timeout_s``: the rejected sender never sends, the owner waits for it).
- A peer done with matchmaking must not stay visible as "looking": peers coming later would wait for it to lead
  and average alone after ``join_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import torch

from swarm.dht import DHT, DHTConfig
from swarm.dht.keys import owner_subkey
from swarm.p2p import RpcContext
from swarm.averaging import Averager, AveragerConfig
from swarm.averaging.allreduce import AllReduceServer, run_allreduce
from swarm.averaging.messages import ReadyHint, ReadyHintReply
from swarm.averaging.partition import flatten_tensors
from swarm.averaging.wire import CompressionPartCodec
from swarm.errors import SwarmError
from tests.averaging.conftest import fixed_groups, random_tensors, transports, weighted_mean

SHAPES = [(37, 11), (301,)]


def _config(**kw: object) -> AveragerConfig:
    base: dict[str, object] = {
        "target_group_size": 3,
        "min_group_size": 2,
        "matchmaking_time_s": 20.0,
        "join_timeout_s": 3.0,
        "allreduce_timeout_s": 20.0,
        "part_timeout_s": 3.0,
        "part_size_bytes": 4096,
        "poll_interval_s": 0.05,
    }
    base.update(kw)
    return AveragerConfig(**base)  # type: ignore[arg-type]


async def _until(condition: object, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition()`` (bounded) until it holds."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


# ---- the all-reduce side: a member's begin arrives after another member's first request ---------------------


async def test_a_member_whose_begin_is_late_waits_for_it_instead_of_rejecting_the_round() -> None:
    cfg = _config()
    weights = [1.0, 2.0, 3.0]
    flats = [flatten_tensors(random_tensors(60 + i, SHAPES)) for i in range(3)]
    expected = weighted_mean(flats, weights)
    async with transports(3, salt=11) as ts:
        servers = [AllReduceServer(cfg, t, CompressionPartCodec("none")) for t in ts]
        for s in servers:
            s.register()
        groups = fixed_groups(ts, "run/avg/0/5")
        key, rid = groups[0].group_key, groups[0].round_id
        arrived: list[str] = []
        real_round_for = servers[2]._round_for

        async def counting_round_for(ctx: RpcContext, group_key: str, round_id: bytes):  # type: ignore[no-untyped-def]
            arrived.append(ctx.peer_id.short())
            return await real_round_for(ctx, group_key, round_id)

        servers[2]._round_for = counting_round_for  # type: ignore[method-assign]
        servers[2].forming(key, True)  # peer 2 is still in matchmaking under the key: its begin is on its way
        for s in servers[:2]:
            s.expect(key, rid)
        async with asyncio.timeout(60):
            early = [
                asyncio.create_task(run_allreduce(s, g, f, w))
                for s, g, f, w in zip(servers[:2], groups[:2], flats[:2], weights[:2], strict=False)
            ]
            try:
                await _until(lambda: len(arrived) == 4, "both members' avg.part and avg.result reached peer 2")
                servers[2].expect(key, rid)  # now its begin arrives
                servers[2].forming(key, False)
                last = await run_allreduce(servers[2], groups[2], flats[2], weights[2])
                outcomes = [*await asyncio.gather(*early), last]
            finally:
                for task in early:
                    task.cancel()
                await asyncio.gather(*early, return_exceptions=True)
    for flat, outcome in zip(flats, outcomes, strict=False):
        assert outcome.lost_owners == () and outcome.dropped_senders == ()
        torch.testing.assert_close(flat.double(), expected, rtol=1e-6, atol=1e-6)


async def test_an_unknown_round_is_rejected_at_once_unless_forming_and_then_by_the_join_deadline() -> None:
    cfg = _config(join_timeout_s=0.3)
    async with transports(2, salt=12) as ts:
        server = AllReduceServer(cfg, ts[0], CompressionPartCodec("none"))
        ctx = RpcContext(peer_id=ts[1].peer_id, remote_host="127.0.0.1", remote_port=1, method="avg.part")
        async with asyncio.timeout(10):
            with pytest.raises(SwarmError, match="not a member"):
                await server._round_for(ctx, "run/avg/0/1", b"\x01" * 32)
            server.forming("run/avg/0/1", True)  # forming, but our begin never comes: the join deadline ends it
            with pytest.raises(SwarmError, match="did not start here"):
                await server._round_for(ctx, "run/avg/0/1", b"\x01" * 32)
            waiting = asyncio.create_task(server._round_for(ctx, "run/avg/0/1", b"\x02" * 32))
            await asyncio.sleep(0)
            server.forming("run/avg/0/1", False)  # matchmaking ended without that round: fail now
            with pytest.raises(SwarmError, match="not a member"):
                await waiting


# ---- matchmaking: withdrawn entries ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def swarm(n: int, cfg: AveragerConfig, *, salt: int) -> AsyncIterator[list[Averager]]:
    async with transports(n, salt=salt) as ts, contextlib.AsyncExitStack() as stack:
        dhts = []
        for i, t in enumerate(ts):
            initial = () if i == 0 else tuple(ts[0].listen_maddrs)
            dhts.append(await stack.enter_async_context(DHT.create(DHTConfig(initial_peers=initial), transport=t)))
        yield [Averager(cfg, transport=t, dht=d) for t, d in zip(ts, dhts, strict=False)]


async def test_peers_after_one_that_went_alone_still_group_without_waiting_for_it() -> None:
    """Peer 0 (ranked first: ready first) finished its round alone; peers 1 and 2 then see 3 entries under the
    key (the target). They must not wait for peer 0 to lead them: its entry is withdrawn."""
    tensors = [random_tensors(70 + i, SHAPES) for i in range(3)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors[1:]], [1.0, 1.0])
    async with swarm(3, _config(join_timeout_s=20.0), salt=13) as avgs:
        async with asyncio.timeout(60):
            first = await avgs[0].step(tensors[0], weight=1.0, group_key="run/avg/1/4", target_group_size=1)
            assert first.group_size == 1
            results = await asyncio.gather(
                *(
                    a.step(t, weight=1.0, group_key="run/avg/1/4", timeout_s=10.0)
                    for a, t in zip(avgs[1:], tensors[1:], strict=False)
                )
            )
    assert all(r.with_others and r.group_size == 2 for r in results)
    for t in tensors[1:]:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_a_waiting_peer_leads_once_the_peer_ranked_first_withdraws() -> None:
    """Peers 1 and 2 see peer 0 looking (ranked first) and wait for it to lead; it withdraws without recruiting
    them (it formed another group): peer 1, now first, leads peer 2 before the join deadline."""
    tensors = [random_tensors(80 + i, SHAPES) for i in range(2)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 1.0])
    key = "run/avg/0/9"
    async with swarm(3, _config(join_timeout_s=20.0), salt=14) as avgs:
        ghost = avgs[0].matchmaker
        subkey = owner_subkey(ghost.transport.peer_id)
        expiration = time.time() + 60.0
        info = ghost.my_info(1.0)
        await ghost.dht.store(
            key,
            {
                "ready_at": info.ready_at - 1.0,
                "weight": 1.0,
                "bandwidth": None,
                "client_mode": False,
                "maddrs": list(info.maddrs),
            },
            expiration,
            subkey=subkey,
        )
        async with asyncio.timeout(60):
            steps = [
                asyncio.create_task(a.step(t, weight=1.0, group_key=key, timeout_s=15.0))
                for a, t in zip(avgs[1:], tensors, strict=False)
            ]
            try:
                looking = [a.matchmaker._looking for a in avgs[1:]]
                await _until(lambda: all(key in lk and lk[key].phase == "waiting" for lk in looking), "both wait")
                await ghost.dht.store(key, {"closed": True}, expiration + 1.0, subkey=subkey)
                results = await asyncio.gather(*steps)
            finally:
                for task in steps:
                    task.cancel()
                await asyncio.gather(*steps, return_exceptions=True)
    assert all(r.with_others and r.group_size == 2 for r in results)
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)


async def test_a_late_peer_seeing_only_withdrawn_entries_stops_gathering_at_once() -> None:
    """Peers 0 and 1 averaged together; peer 2 comes later with target 3: the two withdrawn entries count toward
    the target, so it goes alone without waiting its (here 60 s) window."""
    tensors = [random_tensors(90 + i, SHAPES) for i in range(3)]
    async with swarm(3, _config(matchmaking_time_s=60.0, join_timeout_s=60.0), salt=15) as avgs:
        async with asyncio.timeout(30):
            pair = await asyncio.gather(
                *(
                    a.step(t, weight=1.0, group_key="run/avg/0/2", target_group_size=2)
                    for a, t in zip(avgs[:2], tensors[:2], strict=False)
                )
            )
            assert all(r.group_size == 2 for r in pair)
            late = await avgs[2].step(tensors[2], weight=1.0, group_key="run/avg/0/2", target_group_size=3)
    assert not late.with_others and late.group_size == 1


async def test_a_ready_hint_wakes_the_peer_ranked_first_instead_of_its_next_poll() -> None:
    """Peer 0 read the key before peer 1 stored its entry, and would re-read only after its 30 s poll. Peer 1
    sees peer 0 ranked first and sends it `avg.ready`: peer 0 re-reads at once and leads, well inside the 10 s
    the steps get. A hint from a peer the last read already found, or under a key nobody gathers under, wakes
    nothing."""
    tensors = [random_tensors(100 + i, SHAPES) for i in range(2)]
    expected = weighted_mean([flatten_tensors(t) for t in tensors], [1.0, 2.0])
    key = "run/avg/0/11"
    async with swarm(3, _config(poll_interval_s=30.0, join_timeout_s=20.0), salt=16) as avgs:
        async with asyncio.timeout(30):
            first = asyncio.create_task(
                avgs[0].step(tensors[0], weight=1.0, group_key=key, target_group_size=2, timeout_s=10.0)
            )
            try:
                looking = avgs[0].matchmaker._looking
                await _until(
                    lambda: key in looking and looking[key].seen == {avgs[0].transport.peer_id.to_bytes()},
                    "peer 0 read the key and found only itself",
                )
                me = avgs[0].transport.peer_id
                seen_ctx = RpcContext(peer_id=me, remote_host="127.0.0.1", remote_port=1, method="avg.ready")
                assert not (await avgs[0].matchmaker.rpc_ready(seen_ctx, ReadyHint(group_key=key))).woken
                other_key = await avgs[2].transport.call(
                    me, "avg.ready", ReadyHint(group_key="run/avg/0/12"), ReadyHintReply
                )
                assert not other_key.woken and not looking[key].wake.is_set()
                second = await avgs[1].step(tensors[1], weight=2.0, group_key=key, target_group_size=2, timeout_s=10.0)
                results = [await first, second]
            finally:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
    assert all(r.with_others and r.group_size == 2 for r in results)
    for t in tensors:
        torch.testing.assert_close(flatten_tensors(t).double(), expected, rtol=1e-6, atol=1e-6)
