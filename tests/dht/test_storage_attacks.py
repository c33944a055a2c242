"""Storage attacks against DHT nodes on loopback (raw STOREs, as a malicious peer sends them): junk subkeys that
would push a reply over the message cap, a plain value over owner-signed subkeys, a sender's cache flag, byte
floods from one identity and from many identities of one IP, and the eviction preference for a run's keys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from dht_testutil import dht_config, make_identity, swarm

from swarm.dht import DHT, owner_subkey
from swarm.dht.messages import NodeInfo, StoreReply, StoreRequest
from swarm.dht.records import Record, make_record
from swarm.dht.routing import key_id_of
from swarm.errors import RemoteError
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.messages import Message

VALUE = bytes(60 * 1024)
MIB = 1024 * 1024
SIX_DAYS_S = 6 * 86400.0


@contextlib.asynccontextmanager
async def attacker(i: int) -> AsyncIterator[Transport]:
    """A bare transport under a fresh identity: it sends whatever it likes."""
    async with Transport(make_identity(i, salt="attacker"), TransportConfig(listen_maddrs=())) as t:
        yield t


async def raw_store(t: Transport, node: DHT, records: Sequence[Record]) -> list[bool]:
    stored: list[bool] = []
    for first in range(0, len(records), 64):
        req = StoreRequest(records=tuple(records[first : first + 64]))
        reply = await t.call(node.listen_maddrs[0], "dht.store", req, StoreReply, timeout_s=20.0)
        stored.extend(reply.stored)
    return stored


async def test_200_junk_subkeys_of_60kb_do_not_break_get_and_the_owner_is_returned() -> None:
    """200 x 60 KB junk subkeys on one key (12 MB, over the 8 MiB message cap): replies are paged, owned subkeys
    first, and get returns the whole dictionary (with latest=True from the three holders)."""
    async with asyncio.timeout(120), swarm(3) as s:
        owner = s.nodes[1]
        assert await owner.store("run/peers", "mine", time.time() + 60, subkey=owner_subkey(owner.peer_id))
        for n in range(4):  # four identities: each stays within its share of the holders' budgets
            junk = [make_record("run/peers", VALUE, time.time() + 600, subkey=f"j{i}") for i in range(n, 200, 4)]
            async with attacker(n) as t:
                for node in s.nodes:
                    assert all(await raw_store(t, node, junk))
        for latest in (False, True):
            async with DHT.create(dht_config(client_mode=True, initial_peers=(s.nodes[0].listen_maddrs[0],))) as r:
                found = await r.get("run/peers", latest=latest)
                assert isinstance(found, dict) and len(found) == 201, latest
                assert found[owner_subkey(owner.peer_id)].value == "mine"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StoreWithCacheFlag(Message):
    """The STORE of before issue 13, whose sender could ask the receiver to cache."""

    sender: NodeInfo | None = None
    records: tuple[Record, ...]
    cache: bool = True


async def test_a_sender_cannot_make_a_node_cache() -> None:
    async with asyncio.timeout(30), swarm(2) as s, attacker(0) as t:
        node = s.nodes[0]
        record = make_record("c", 1, time.time() + 60)
        with pytest.raises(RemoteError, match="unknown fields"):
            await t.call(node.listen_maddrs[0], "dht.store", _StoreWithCacheFlag(records=(record,)), StoreReply)
        assert len(node.cache) == 0 and len(node.storage) == 0
        assert await raw_store(t, node, [record]) == [True]  # a STORE lands in storage, charged to its sender
        assert len(node.cache) == 0 and node.storage.get(key_id_of("c")) == [record]


async def test_a_plain_value_never_replaces_owner_signed_peer_records() -> None:
    """The issue's `swarm-dht put <run>/peers '"x"' --ttl 600000`: refused by every node; a holder that serves a
    plain value anyway does not hide the owners' records from readers; the owners' re-stores succeed."""
    async with asyncio.timeout(60), swarm(4) as s:
        a, b, mallory = s.nodes[0], s.nodes[1], s.nodes[3]
        for node in (a, b):
            assert await node.store(
                "run/peers", node.peer_id.short(), time.time() + 30, subkey=owner_subkey(node.peer_id)
            )
        plain = make_record("run/peers", "x", time.time() + SIX_DAYS_S)
        async with attacker(0) as t:
            for node in s.nodes:
                assert await raw_store(t, node, [plain]) == [False]
        mallory.storage.clear()  # a malicious holder: it serves the plain value alone
        assert mallory.storage.put(key_id_of("run/peers"), plain)
        found = await s.nodes[2].get("run/peers", latest=True)
        assert isinstance(found, dict) and set(found) == {owner_subkey(a.peer_id), owner_subkey(b.peer_id)}
        assert await a.store("run/peers", "renewed", time.time() + 30, subkey=owner_subkey(a.peer_id))
        found = await s.nodes[2].get("run/peers", latest=True)
        assert isinstance(found, dict) and found[owner_subkey(a.peer_id)].value == "renewed"


async def test_byte_floods_from_one_identity_and_from_many_identities_of_one_ip_are_capped() -> None:
    """Scaled down: a 4 MiB budget, 12 MB from one identity, then 12 MB from 20 identities of 127.0.0.1."""
    async with asyncio.timeout(60), swarm(1, storage_budget_bytes=4 * MIB) as s:
        node = s.nodes[0]
        async with attacker(0) as t:
            flags = await raw_store(t, node, [make_record(f"f/{i}", VALUE, time.time() + 600) for i in range(200)])
            assert 0 < sum(flags) < 200
            assert node.storage.bytes_from(t.peer_id) <= 4 * MIB // 8  # max_share_per_peer
        for n in range(1, 21):
            async with attacker(n) as t:
                await raw_store(t, node, [make_record(f"s{n}/{i}", VALUE, time.time() + 600) for i in range(10)])
        assert node.storage.bytes_from_host("127.0.0.1") <= 4 * MIB // 4  # max_share_per_ip
        assert node.storage.size_bytes <= 4 * MIB


async def test_records_of_preferred_prefixes_survive_a_flood() -> None:
    """A node that takes part in run1 keeps run1's records when junk from many senders fills its budget."""
    limits = {"storage_budget_bytes": 2 * MIB, "max_share_per_peer": 1.0, "max_share_per_ip": 1.0}
    async with asyncio.timeout(60), swarm(1, **limits) as s:
        node = s.nodes[0]
        node.prefer_prefixes(["run1/"])
        async with attacker(100) as t:
            mine = [make_record(f"run1/part{i}", VALUE, time.time() + 60) for i in range(8)]  # soonest to expire
            assert all(await raw_store(t, node, mine))
        stored = 0
        for n in range(40):
            async with attacker(n) as t:
                stored += sum(await raw_store(t, node, [make_record(f"junk{n}", VALUE, time.time() + 3600)]))
        assert stored >= 20  # the junk filled the rest; then it was refused rather than evict run1's records
        assert all(node.storage.get(key_id_of(r.unpacked_key())) == [r] for r in mine)
        assert node.storage.size_bytes <= 2 * MIB
