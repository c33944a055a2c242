"""Storage: newer wins, dictionary values, expiry, limits per node and per source."""

from __future__ import annotations

from swarm.dht.records import make_record
from swarm.dht.storage import MemoryStorage, StorageConfig

from dht_testutil import make_identity


def _storage(clock, **kw) -> MemoryStorage:  # type: ignore[no-untyped-def]
    return MemoryStorage(StorageConfig(**kw), clock=clock)


def test_newer_wins_and_expired_vanish(clock) -> None:  # type: ignore[no-untyped-def]
    s = _storage(clock)
    old, new = make_record("k", "old", clock() + 10), make_record("k", "new", clock() + 20)
    assert s.put(1, old) and s.put(1, new)
    assert not s.put(1, old)
    assert s.get(1) == [new]
    clock.advance(20)
    assert s.get(1) == [] and len(s) == 0 and s.key_ids() == []
    assert not s.put(1, make_record("k", "late", clock() - 1))


def test_dictionary_values(clock) -> None:  # type: ignore[no-untyped-def]
    s = _storage(clock)
    a = make_record("k", 1, clock() + 10, subkey="a")
    b = make_record("k", 2, clock() + 30, subkey="b")
    assert s.put(7, a) and s.put(7, b)
    assert sorted(r.unpacked_value() for r in s.get(7)) == [1, 2]
    clock.advance(15)  # subkey a expires on its own
    assert [r.unpacked_subkey() for r in s.get(7)] == ["b"]
    # a plain value older than the dictionary loses; a newer one replaces it
    assert not s.put(7, make_record("k", "plain", clock() + 5))
    plain = make_record("k", "plain", clock() + 40)
    assert s.put(7, plain) and s.get(7) == [plain] and len(s) == 1
    assert not s.put(7, make_record("k", 3, clock() + 20, subkey="c"))
    assert s.put(7, make_record("k", 3, clock() + 50, subkey="c")) and len(s) == 1


def test_limits_total_and_per_source(clock) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_identity(1).peer_id, make_identity(2).peer_id
    s = _storage(clock, max_records=5, max_records_per_source=2)
    assert s.put(1, make_record("a1", 1, clock() + 10), source=alice)
    assert s.put(2, make_record("a2", 1, clock() + 10), source=alice)
    assert not s.put(3, make_record("a3", 1, clock() + 10), source=alice)
    assert s.put(2, make_record("a2", 2, clock() + 20), source=alice)  # replacing its own slot is fine
    assert s.count_from(alice) == 2
    assert s.put(4, make_record("b1", 1, clock() + 10), source=bob)
    assert s.put(5, make_record("x", 1, clock() + 10))
    assert s.put(6, make_record("y", 1, clock() + 10))
    assert not s.put(8, make_record("z", 1, clock() + 10))  # full
    clock.advance(11)  # the 10 s records expire, making room
    assert s.put(8, make_record("z", 1, clock() + 10)) and s.count_from(alice) == 1
