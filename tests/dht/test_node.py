"""DHT nodes on loopback: store/get everywhere, k-closest, owned records, expiry, client mode, bootstrap,
hand-over to a joining node, path caching, republish, bad input, clean stop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
from dht_testutil import LOOPBACK, FakeClock, Swarm, dht_config, make_identity, swarm, wait_until

from swarm.dht import DHT, owner_subkey
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.messages import packb
from swarm.dht.messages import FindNodeRequest, FindNodeReply, NodeInfo, PingReply, PingRequest
from swarm.dht.records import Record, make_record
from swarm.dht.routing import key_id_of
from swarm.dht.storage import MemoryStorage, StorageConfig
from swarm.p2p import Transport, TransportConfig
from swarm.errors import BootstrapError, RecordError, RemoteError


def _brute_force_closest(nodes: list[DHT], key: str, k: int) -> list:
    kid = key_id_of(key)
    return [n.peer_id for n in sorted(nodes, key=lambda n: n.table.local_id ^ kid)[:k]]


async def test_every_key_found_from_every_node_and_k_closest_match() -> None:
    async with asyncio.timeout(60), swarm(14, bucket_size=4) as s:
        now = time.time()
        keys = [f"key{i}" for i in range(8)]
        for i, key in enumerate(keys):
            assert await s.nodes[i % 14].store(key, {"i": i}, now + 60)
        for node in s.nodes:
            for i, key in enumerate(keys):
                found = await node.get(key)
                assert found is not None and found.value == {"i": i}, (node.peer_id, key)
        for i, key in enumerate(keys):
            origin = s.nodes[(3 * i) % 14]
            peers = await origin.find_peers(key, 4)
            others = [n for n in s.nodes if n is not origin]
            assert [c.peer_id for c in peers] == _brute_force_closest(others, key, 4)
            # the record sits on the k closest nodes of the whole swarm
            holders = {n.peer_id for n in s.nodes if n.storage.get(key_id_of(key))}
            assert set(_brute_force_closest(s.nodes, key, 4)) <= holders


async def test_dictionary_values_and_newer_wins() -> None:
    async with asyncio.timeout(30), swarm(6) as s:
        now = time.time()
        a, b = s.nodes[1], s.nodes[4]
        assert await a.store("run/peers", {"role": "stage"}, now + 30, subkey=owner_subkey(a.peer_id))
        assert await b.store("run/peers", {"role": "driver"}, now + 40, subkey=owner_subkey(b.peer_id))
        got = await s.nodes[0].get("run/peers", latest=True)
        assert {k: v.value for k, v in got.items()} == {
            owner_subkey(a.peer_id): {"role": "stage"},
            owner_subkey(b.peer_id): {"role": "driver"},
        }
        assert await a.store("x", "old", now + 10) and await b.store("x", "new", now + 20)
        assert not await a.store("x", "older", now + 5)
        assert (await s.nodes[3].get("x", latest=True)).value == "new"


async def test_forged_unsigned_tampered_owned_records_rejected_by_every_node() -> None:
    async with asyncio.timeout(30), swarm(6) as s:
        owner, mallory = s.nodes[0], s.nodes[5]
        now = time.time()
        good = make_record("k", 1, now + 30, subkey=owner_subkey(owner.peer_id), identity=owner.identity)
        bad = [
            dataclasses.replace(good, signature=b""),
            dataclasses.replace(good, signature=mallory.identity.sign(good.signing_payload())),
            dataclasses.replace(good, value=packb(2)),
        ]
        for node in s.nodes[:5]:
            flags = await mallory.protocol.call_store(node.peer_id, bad)
            assert flags == [False, False, False]
            assert node.storage.get(key_id_of("k")) == []
        with pytest.raises(RecordError):  # the API refuses to write a key owned by someone else
            await mallory.store("k", 1, now + 30, subkey=owner_subkey(owner.peer_id))
        # a malicious holder that serves a tampered record: every reader drops it
        mallory.storage.put(key_id_of("k"), bad[2])
        for node in s.nodes[:5]:
            assert await node.get("k", latest=True) is None
        assert await owner.store("k", 1, now + 30, subkey=owner_subkey(owner.peer_id))
        assert (await s.nodes[2].get("k"))[owner_subkey(owner.peer_id)].value == 1


async def test_expired_values_vanish() -> None:
    clock = FakeClock(time.time())
    async with asyncio.timeout(30), swarm(5, clock=clock) as s:
        assert await s.nodes[0].store("e", "v", clock() + 10)
        assert (await s.nodes[3].get("e")).value == "v"
        clock.advance(11)
        for node in s.nodes:
            assert await node.get("e", latest=True) is None
            assert node.storage.get(key_id_of("e")) == []


async def test_client_mode_gets_and_stores_but_is_never_routed() -> None:
    async with asyncio.timeout(30), swarm(6) as s:
        client = await s.add(dht_config(client_mode=True))
        assert client.listen_maddrs == ()
        assert await client.store("c", 42, time.time() + 30)
        assert (await s.nodes[2].get("c")).value == 42
        assert (await client.get("c")).value == 42
        assert len(client.table) > 0
        for node in s.nodes[:6]:
            assert client.peer_id not in node.table
        assert client.storage.get(key_id_of("c")) == []


async def test_bootstrap_error_when_no_initial_peer_answers() -> None:
    dead = make_identity(77).peer_id
    cfg = dht_config(initial_peers=(f"/ip4/127.0.0.1/tcp/9/p2p/{dead}",), rpc_timeout_s=1.0, lookup_timeout_s=2.0)
    tasks_before = set(asyncio.all_tasks())
    with pytest.raises(BootstrapError, match="none of the 1 initial peers answered"):
        async with asyncio.timeout(10), DHT.create(cfg):
            pass
    assert set(asyncio.all_tasks()) - tasks_before == set()


async def test_joining_node_receives_the_keys_it_is_responsible_for() -> None:
    async with asyncio.timeout(60), swarm(16, bucket_size=3, seed=3) as s:
        now = time.time()
        keys = [f"h{i}" for i in range(40)]
        for i, key in enumerate(keys):
            assert await s.nodes[i % 16].store(key, i, now + 60)
        newcomer = await s.add(bucket_size=3)
        mine = [key for key in keys if newcomer.peer_id in _brute_force_closest(s.nodes, key, 3)]
        assert mine, "the seed should give the newcomer some keys"
        await wait_until(lambda: all(newcomer.storage.get(key_id_of(k)) for k in mine), timeout_s=10)


async def test_found_values_are_cached_by_the_reader_for_cache_ttl_s() -> None:
    """The node that fetched a value keeps it in its own cache and serves the next get from there, for at most
    cache_ttl_s; no other node caches anything (a STORE never lands in a cache: the receiver decides)."""
    clock = FakeClock(time.time())
    async with asyncio.timeout(60), swarm(16, bucket_size=2, seed=5, clock=clock, cache_ttl_s=30.0) as s:
        readers = []
        for i in range(10):
            key = f"p{i}"
            assert await s.nodes[0].store(key, i, clock() + 600)
            reader = s.nodes[1 + i]
            if reader.storage.get(key_id_of(key)):
                continue  # a holder of the key has nothing to fetch
            assert (await reader.get(key)).value == i
            assert reader.last_lookup is not None  # it asked the network
            assert [r.unpacked_value() for r in reader.cache.get(key_id_of(key))] == [i]
            assert (await reader.get(key)).value == i
            assert reader.last_lookup is None  # served from its cache
            readers.append(reader)
        assert len(readers) >= 5
        for node in s.nodes:
            if node not in readers:
                assert len(node.cache) == 0
        clock.advance(31)  # past cache_ttl_s, long before the records expire
        for reader in readers:
            assert len(reader.cache) == 0


async def test_republish_restores_records_and_refresh_runs() -> None:
    clock = FakeClock(time.time())
    async with asyncio.timeout(30), swarm(6, clock=clock, republish_interval_s=100.0) as s:
        origin = s.nodes[0]
        assert await origin.store("r", "v", clock() + 1000)
        for node in s.nodes:
            node.storage.clear()  # every holder forgets it (e.g. restarted)
        assert await s.nodes[2].get("r", latest=True) is None
        clock.advance(101)
        await origin.maintain()
        assert (await s.nodes[2].get("r", latest=True)).value == "v"
        assert origin.table.stale_buckets(clock(), origin.config.refresh_interval_s) == []


async def test_bad_requests_are_refused_and_the_node_keeps_serving() -> None:
    async with asyncio.timeout(30), swarm(3) as s:
        a, b = s.nodes[0], s.nodes[1]
        t = a.transport
        await t.call(b.peer_id, "dht.find_node", FindNodeRequest(target=bytes(32)), FindNodeReply)
        with pytest.raises(RemoteError):  # a target that is not a 32-byte ID
            await t.call(b.peer_id, "dht.find_node", _BadTarget(target=b"x"), FindNodeReply)
        impostor = NodeInfo(peer_id=make_identity(9).peer_id.to_bytes(), maddrs=("/ip4/127.0.0.1/tcp/1",))
        with pytest.raises(RemoteError, match="sender does not match"):
            await t.call(b.peer_id, "dht.ping", PingRequest(sender=impostor), PingReply)
        assert make_identity(9).peer_id not in b.table
        assert (await t.call(b.peer_id, "dht.ping", PingRequest(), PingReply)).peer.peer_id == b.peer_id.to_bytes()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _BadTarget(FindNodeRequest):
    def __post_init__(self) -> None:  # skips the sender-side check, so the server sees the bad size
        pass


@pytest.mark.parametrize("failure", ["closed", "blackholed"])
async def test_churn_gets_succeed_and_are_bounded(failure: str) -> None:
    """30% of nodes stop without warning: their port refuses connections ("closed"), or accepts and never
    answers ("blackholed", like a frozen machine). Gets still succeed and stay within ~1.5 x rpc_timeout_s."""
    blackholes: list[asyncio.Server] = []
    transport = TransportConfig(
        listen_maddrs=LOOPBACK, idle_timeout_s=5.0, connect_timeout_s=1.0, handshake_timeout_s=1.0
    )
    try:
        async with (
            asyncio.timeout(240),
            swarm(
                30,
                seed=7,
                bucket_size=8,
                rpc_timeout_s=1.0,
                slow_after_s=0.3,
                lookup_timeout_s=1.5,
                transport=transport,
            ) as s,
        ):
            now = time.time()
            keys = [f"c{i}" for i in range(40)]
            for i, key in enumerate(keys):
                assert await s.nodes[i % 30].store(key, i, now + 300)
            for node in [*s.rng.sample(s.nodes[1:], 8), s.nodes[0]]:  # the bootstrap node leaves too
                host_port = parse_maddr(node.listen_maddrs[0])
                await node.shutdown()
                if failure == "blackholed":
                    blackholes.append(await asyncio.start_server(_never_answer, host_port.host, host_port.port))
            alive = s.alive()
            loop = asyncio.get_running_loop()
            ok, worst_s = 0, 0.0
            for i, key in enumerate(keys * 2):
                start = loop.time()
                found = await alive[i % len(alive)].get(key)
                worst_s = max(worst_s, loop.time() - start)
                ok += found is not None and found.value == i % 40
            assert ok / 80 >= 0.99
            assert worst_s <= 1.5 * 1.0 + 0.5, worst_s  # about 1.5 x rpc_timeout_s
    finally:
        for server in blackholes:
            server.close()
            await server.wait_closed()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(30):
            while await reader.read(65536):
                pass
    except TimeoutError:
        pass
    finally:
        writer.close()


async def test_stop_leaves_no_task_or_socket() -> None:
    proc_fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    tasks_before, fds_before = set(asyncio.all_tasks()), proc_fds()
    async with asyncio.timeout(30):
        s = Swarm(seed=11)
        try:
            for _ in range(5):
                await s.add(maintenance_interval_s=0.05)
            await s.nodes[1].store("z", 1, time.time() + 30)
            await asyncio.sleep(0.1)  # let maintenance run a few passes
        finally:
            await s.stop_all()
    assert set(asyncio.all_tasks()) - tasks_before == set()
    assert proc_fds() <= fds_before


class _EvenValues:
    """A schema for keys starting with "even/": the value must be an even int."""

    def validate(self, record: Record) -> None:
        if record.unpacked_key().startswith("even/") and record.unpacked_value() % 2:
            raise RecordError("even/ keys need even values")

    def select(self, current: Record, candidate: Record) -> Record | None:
        return None


async def test_validators_and_custom_storage_plug_in() -> None:
    clock = FakeClock(time.time())
    storage = MemoryStorage(StorageConfig(max_records=10, max_records_per_source=10), clock=clock)
    async with asyncio.timeout(30), swarm(3, validators=(_EvenValues(),), clock=clock) as s:
        lax = await s.add(dht_config(clock=clock))  # a node without the schema
        mine = DHT.create(
            dht_config(initial_peers=(s.nodes[0].listen_maddrs[0],), clock=clock, validators=(_EvenValues(),)),
            storage=storage,
        )
        async with mine:
            assert await mine.store("even/a", 2, clock() + 30)
            assert storage.get(key_id_of("even/a"))  # the injected storage holds what this node keeps
            assert (await lax.get("even/a")).value == 2
            with pytest.raises(RecordError, match="even values"):
                await mine.store("even/b", 3, clock() + 30)
            odd = make_record("even/b", 3, clock() + 30)
            for node in [*s.nodes[:3], mine]:
                assert await lax.protocol.call_store(node.peer_id, [odd]) == [False]


async def test_a_dht_on_a_shared_transport_stops_serving_on_shutdown_and_a_new_one_can_take_over() -> None:
    """The transport outlives the DHT: after shutdown its dht.* methods answer `unknown_method`, and a new DHT
    can register on the same transport and serve."""
    identity = make_identity(0, salt="shared")
    async with (
        asyncio.timeout(30),
        Transport(identity, TransportConfig(listen_maddrs=LOOPBACK)) as shared,
        DHT.create(dht_config(), identity=make_identity(1, salt="shared")) as other,
    ):
        async with DHT.create(dht_config(), identity=identity, transport=shared):
            reply = await other.transport.call(shared.listen_maddrs[0], "dht.ping", PingRequest(), PingReply)
            assert reply.peer.peer_id == identity.peer_id.to_bytes()
        with pytest.raises(RemoteError, match="unknown_method"):
            await other.transport.call(shared.listen_maddrs[0], "dht.ping", PingRequest(), PingReply)
        async with DHT.create(dht_config(), identity=identity, transport=shared):
            reply = await other.transport.call(shared.listen_maddrs[0], "dht.ping", PingRequest(), PingReply)
            assert reply.peer.peer_id == identity.peer_id.to_bytes()


async def test_routing_table_contacts_are_protected_on_the_transport() -> None:
    """The transport never evicts the connections of routing-table peers (docs/transport.md, "Connection budgets")."""
    async with asyncio.timeout(60), swarm(5, bucket_size=4) as s:
        for node in s.nodes:
            contacts = {c.peer_id for c in node.table.contacts()}
            assert contacts and node.transport.protected_peers("dht.routing") == contacts
        node = s.nodes[0]
        gone = node.table.contacts()[0].peer_id
        node.protocol.peer_failed(gone)
        assert not node.transport.is_protected(gone)
    identity = make_identity(0, salt="protect")
    async with (
        asyncio.timeout(30),
        Transport(identity, TransportConfig(listen_maddrs=LOOPBACK)) as shared,
        DHT.create(dht_config(), identity=make_identity(1, salt="protect")) as other,
    ):
        async with DHT.create(dht_config(initial_peers=other.listen_maddrs), identity=identity, transport=shared):
            assert shared.is_protected(other.peer_id)
        assert shared.protected_peers() == set()  # the DHT stopped: the shared transport protects nothing for it
