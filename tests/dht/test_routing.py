"""k-buckets: XOR distance, bucket placement, LRS ordering, ping-before-evict, replacement cache."""

from __future__ import annotations

import random

from swarm.dht.routing import ID_BITS, Contact, RoutingTable, key_id_of, node_id_of

from dht_testutil import make_identity


def _contacts(n: int) -> list[Contact]:
    return [Contact(make_identity(i).peer_id, (f"/ip4/127.0.0.1/tcp/{1000 + i}",)) for i in range(n)]


def test_node_id_is_hash_of_peer_id_and_keys_are_typed() -> None:
    a, b = make_identity(1).peer_id, make_identity(2).peer_id
    assert node_id_of(a) == node_id_of(a) != node_id_of(b)
    assert 0 < node_id_of(a) < 2**ID_BITS
    assert key_id_of("k") != key_id_of(b"k")


def test_bucket_index_matches_distance_range() -> None:
    table = RoutingTable(0b1000, bucket_size=2)
    assert table.bucket_index(0b1001) == 0
    assert table.bucket_index(0b0000) == 3
    assert table.bucket_index(2**255) == 255
    rng = random.Random(0)
    for i in (0, 1, 7, 100, 255):
        target = table.random_id_in_bucket(i, rng)
        assert table.bucket_index(target) == i


def test_nearest_matches_brute_force() -> None:
    contacts = _contacts(120)
    table = RoutingTable(node_id_of(make_identity(999).peer_id), bucket_size=20)
    for c in contacts:
        table.add(c)
    rng = random.Random(1)
    for _ in range(20):
        target = rng.getrandbits(ID_BITS)
        known = table.contacts()
        expected = sorted(known, key=lambda c: c.node_id ^ target)[:20]
        assert table.nearest(target, 20) == expected


def test_full_bucket_returns_lrs_then_evicts_and_promotes_replacement() -> None:
    local = 0
    table = RoutingTable(local, bucket_size=2)
    # all contacts of the top bucket (255) are the ones with the high bit set
    top = [c for c in _contacts(40) if c.node_id >> 255][:4]
    assert table.add(top[0]) is None and table.add(top[1]) is None
    assert table.add(top[2]) == top[0]  # full: ping the least-recently seen first
    assert top[2].peer_id not in table
    # the LRS answered: it moves to the tail, so the next candidate to ping is top[1]
    table.add(top[0])
    assert table.add(top[3]) == top[1]
    # top[1] failed to answer: evicted, and the most recent replacement (top[3]) takes its place
    assert table.remove(top[1].peer_id) == top[3]
    assert set(c.peer_id for c in table.contacts()) == {top[0].peer_id, top[3].peer_id}
    assert table.remove(top[0].peer_id) == top[2]


def test_stale_buckets_and_refresh(clock) -> None:  # type: ignore[no-untyped-def]
    table = RoutingTable(0, bucket_size=4, clock=clock)
    c = _contacts(1)[0]
    table.add(c)
    index = table.bucket_index(c.node_id)
    assert table.stale_buckets(clock(), 60.0) == [i for i in range(index, ID_BITS) if i != index]
    clock.advance(61)
    assert index in table.stale_buckets(clock(), 60.0)
    table.mark_refreshed(index)
    assert index not in table.stale_buckets(clock(), 60.0)
