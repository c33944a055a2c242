"""The iterative lookup on a simulated network: brute-force k-closest, value quorum, slow peers."""

from __future__ import annotations

import asyncio
import functools
import random

from dht_testutil import make_identity

from swarm.p2p.identity import PeerID
from swarm.dht.lookup import LookupParams, LookupReply, iterative_lookup
from swarm.dht.records import make_record
from swarm.dht.routing import ID_BITS, Contact, RoutingTable


class SimNet:
    """N simulated nodes, each with a real RoutingTable filled with every other node."""

    def __init__(self, n: int, k: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.contacts = [Contact(make_identity(i).peer_id) for i in range(n)]
        self.tables: dict[PeerID, RoutingTable] = {}
        for c in self.contacts:
            table = RoutingTable(c.node_id, bucket_size=k)
            others = [o for o in self.contacts if o is not c]
            rng.shuffle(others)
            for o in others:
                table.add(o)
            self.tables[c.peer_id] = table
        self.k = k
        self.values: dict[PeerID, list] = {}
        self.calls: list[PeerID] = []

    async def call(self, contact: Contact, target: int) -> LookupReply:
        self.calls.append(contact.peer_id)
        await asyncio.sleep(0)
        return LookupReply(self.tables[contact.peer_id].nearest(target, self.k), self.values.get(contact.peer_id, ()))


async def test_find_node_matches_brute_force_and_rounds_are_few() -> None:
    net = SimNet(150, k=8)
    rng = random.Random(1)
    params = LookupParams(k=8, alpha=3)
    rounds = []
    async with asyncio.timeout(20):
        for _ in range(15):
            target = rng.getrandbits(ID_BITS)
            start = net.contacts[rng.randrange(150)]
            initial = net.tables[start.peer_id].nearest(target, 8)
            result = await iterative_lookup(target, initial, functools.partial(net.call, target=target), params)
            expected = sorted(net.contacts, key=lambda c: c.node_id ^ target)[:8]
            assert [c.peer_id for c in result.closest] == [c.peer_id for c in expected]
            rounds.append(result.rounds)
    assert 1 <= sum(rounds) / len(rounds) <= 4


async def test_find_value_stops_at_quorum() -> None:
    net = SimNet(60, k=5)
    target = random.Random(2).getrandbits(ID_BITS)
    holder = sorted(net.contacts, key=lambda c: c.node_id ^ target)[0]
    record = make_record("k", 1, 2e9)
    net.values[holder.peer_id] = [record]
    initial = net.tables[net.contacts[0].peer_id].nearest(target, 5)
    async with asyncio.timeout(10):
        result = await iterative_lookup(
            target, initial, lambda c: net.call(c, target), LookupParams(k=5, alpha=3, value_quorum=1)
        )
    assert result.found == [(holder, [record])]
    assert holder.peer_id not in [c.peer_id for c in result.without_value]


async def test_failures_are_skipped_and_excluded() -> None:
    net = SimNet(60, k=5)
    target = random.Random(3).getrandbits(ID_BITS)
    dead = {c.peer_id for c in sorted(net.contacts, key=lambda c: c.node_id ^ target)[:3]}

    async def call(contact: Contact) -> LookupReply:
        if contact.peer_id in dead:
            raise ConnectionRefusedError("stopped")
        return await net.call(contact, target)

    initial = net.tables[net.contacts[10].peer_id].nearest(target, 5)
    async with asyncio.timeout(10):
        result = await iterative_lookup(target, initial, call, LookupParams(k=5, alpha=3))
    alive = [c for c in sorted(net.contacts, key=lambda c: c.node_id ^ target) if c.peer_id not in dead]
    assert [c.peer_id for c in result.closest] == [c.peer_id for c in alive[:5]]
    assert result.num_failed >= 1


async def test_slow_peer_does_not_hold_its_slot() -> None:
    """With alpha=1, a slow first peer must not stop the others from being queried meanwhile: the slow
    peer only answers once another peer has been called, so a lookup that waited on it would time it out."""
    net = SimNet(30, k=4)
    target = random.Random(4).getrandbits(ID_BITS)
    slow = sorted(net.contacts, key=lambda c: c.node_id ^ target)[0]
    someone_else_called = asyncio.Event()

    async def call(contact: Contact) -> LookupReply:
        if contact.peer_id == slow.peer_id:
            await someone_else_called.wait()
        else:
            someone_else_called.set()
        return await net.call(contact, target)

    others = [c for c in net.contacts if c.peer_id != slow.peer_id][:3]
    params = LookupParams(k=4, alpha=1, call_timeout_s=2.0, slow_after_s=0.05)
    async with asyncio.timeout(10):
        result = await iterative_lookup(target, [slow, *others], call, params)
    assert result.num_failed == 0
    assert result.closest[0].peer_id == slow.peer_id


async def test_deadline_returns_partial_result() -> None:
    never = asyncio.Event()

    async def call(contact: Contact) -> LookupReply:
        await never.wait()
        return LookupReply()

    contacts = [Contact(make_identity(i).peer_id) for i in range(3)]
    params = LookupParams(k=3, alpha=3, call_timeout_s=5.0, slow_after_s=0.01, deadline_s=0.1)
    async with asyncio.timeout(3):
        result = await iterative_lookup(1, contacts, call, params)
    assert result.timed_out and result.closest == [] and result.num_queried == 3
