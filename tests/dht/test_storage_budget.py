"""Storage in bytes: shares per sender and per source IP, eviction order, preferred prefixes, the subkey bound,
and the rule that a plain value never replaces owner-signed subkeys."""

from __future__ import annotations

import tracemalloc

import pytest
from dht_testutil import FakeClock, make_identity

from swarm.dht import owner_subkey
from swarm.dht.budget import RECORD_OVERHEAD_BYTES, record_size_bytes
from swarm.dht.records import Record, make_record
from swarm.dht.routing import key_id_of
from swarm.dht.storage import MemoryStorage, StorageConfig
from swarm.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
VALUE = bytes(60 * KIB)


def _storage(clock: FakeClock, **kw: object) -> MemoryStorage:
    return MemoryStorage(StorageConfig(**kw), clock=clock)  # type: ignore[arg-type]


def _put(s: MemoryStorage, record: Record, source: int | None = None, host: str | None = "10.0.0.1") -> bool:
    peer = None if source is None else make_identity(source).peer_id
    return s.put(key_id_of(record.unpacked_key()), record, source=peer, host=host)


def test_record_size_counts_key_subkey_value_signature_and_overhead(clock: FakeClock) -> None:
    owner = make_identity(1)
    r = make_record("k", VALUE, clock() + 10, subkey=owner_subkey(owner.peer_id), identity=owner)
    parts = len(r.key) + len(r.subkey or b"") + len(r.value) + len(r.signature)
    assert len(r.signature) == 64 and record_size_bytes(r) == parts + RECORD_OVERHEAD_BYTES


def test_one_identity_flooding_60kb_records_is_capped_in_bytes_and_memory(clock: FakeClock) -> None:
    """The issue's flood, scaled down (1,000 x 60 KB = 60 MB against a 4 MiB budget): one sender keeps at most
    its share, and the memory the storage holds stays under the budget."""
    s = _storage(clock, budget_bytes=4 * MIB, max_share_per_source=0.125)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        stored = sum(_put(s, make_record(f"flood/{i}", VALUE, clock() + 86400), source=1) for i in range(1000))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_record = record_size_bytes(make_record("flood/999", VALUE, clock() + 86400))
    assert stored == (4 * MIB // 8) // per_record == 8
    assert s.size_bytes == s.bytes_from(make_identity(1).peer_id) <= 4 * MIB // 8
    assert held < 4 * MIB // 8 + 64 * KIB, held  # what stays allocated is what the budget counted
    assert _put(s, make_record("other", "v", clock() + 10), source=2)  # another sender still stores


def test_many_identities_from_one_ip_share_one_cap(clock: FakeClock) -> None:
    s = _storage(clock, budget_bytes=4 * MIB, max_share_per_source=0.125, max_share_per_host=0.25)
    stored = sum(
        _put(s, make_record(f"sybil{n}/{i}", VALUE, clock() + 86400), source=100 + n, host="10.6.6.6")
        for n in range(40)
        for i in range(20)
    )
    per_record = record_size_bytes(make_record("sybil10/10", VALUE, clock() + 86400))
    assert stored == (4 * MIB // 4) // per_record
    assert s.bytes_from_host("10.6.6.6") <= MIB
    assert _put(s, make_record("honest", VALUE, clock() + 10), source=1, host="10.0.0.2")


def test_identities_from_one_ipv6_network_share_one_cap(clock: FakeClock) -> None:
    """Addresses of one /64 are one source (a home or a VM gets a whole /64), as for connection budgets."""
    s = _storage(clock, budget_bytes=4 * MIB, max_share_per_source=0.125, max_share_per_host=0.25)
    stored = sum(
        _put(s, make_record(f"v6sybil{n}/{i}", VALUE, clock() + 86400), source=100 + n, host=f"2001:db8:1:2::{n + 1:x}")
        for n in range(40)
        for i in range(20)
    )
    per_record = record_size_bytes(make_record("v6sybil10/10", VALUE, clock() + 86400))
    assert stored == (4 * MIB // 4) // per_record
    assert s.bytes_from_host("2001:db8:1:2::/64") <= MIB
    assert _put(s, make_record("honest", VALUE, clock() + 10), source=1, host="2001:db8:1:3::1")  # another /64


def test_over_budget_evicts_the_largest_sender_soonest_expiring_first(clock: FakeClock) -> None:
    s = _storage(clock, budget_bytes=1 * MIB, max_share_per_source=0.5, max_share_per_host=1.0)
    per = record_size_bytes(make_record("a/0", VALUE, clock() + 100))
    heavy = [make_record(f"a/{i}", VALUE, clock() + 100 + i) for i in range(8)]  # 8 of 16 slots
    light = [make_record(f"b/{i}", VALUE, clock() + 50) for i in range(4)]
    mid = [make_record(f"c/{i}", VALUE, clock() + 60) for i in range(4)]
    assert all(_put(s, r, source=1) for r in heavy)
    assert all(_put(s, r, source=2) for r in light)
    assert all(_put(s, r, source=3) for r in mid)
    assert s.size_bytes + per > 1 * MIB  # full
    assert _put(s, make_record("d/0", VALUE, clock() + 10), source=4)  # takes the heaviest sender's soonest
    assert s.get(key_id_of("a/0")) == [] and s.get(key_id_of("a/1")) == [heavy[1]]
    assert all(s.get(key_id_of(f"b/{i}")) for i in range(4))
    # a sender never evicts one that would then hold no more than itself
    assert _put(s, make_record("c/4", VALUE, clock() + 60), source=3)  # 5 records; source 1 had 7
    assert s.bytes_from(make_identity(1).peer_id) == 6 * per
    assert not _put(s, make_record("c/5", VALUE, clock() + 60), source=3)  # it would hold 6, as many as source 1
    assert all(s.get(key_id_of(f"b/{i}")) for i in range(4))


def test_preferred_prefixes_are_evicted_last_and_only_by_preferred_records(clock: FakeClock) -> None:
    s = _storage(clock, budget_bytes=1 * MIB, max_share_per_source=1.0, max_share_per_host=1.0)
    s.prefer(["run1/"])
    mine = [make_record(f"run1/peers{i}", VALUE, clock() + 10) for i in range(4)]  # expire soonest
    assert all(_put(s, r, source=1) for r in mine)
    other = [make_record(f"junk/{i:02d}", VALUE, clock() + 1000) for i in range(12)]  # equal sizes
    assert all(_put(s, r, source=100 + i) for i, r in enumerate(other))  # one record per sender
    assert not _put(s, make_record("junk/xx", VALUE, clock() + 1000), source=3)  # cannot evict run1/ records
    assert _put(s, make_record("run1/progress", VALUE, clock() + 10), source=4)  # evicts a junk record
    assert all(s.get(key_id_of(r.unpacked_key())) for r in mine)
    assert sum(bool(s.get(key_id_of(r.unpacked_key()))) for r in other) == 11
    s.prefer([])  # no longer preferred: the next newcomer may take their place, largest sender first
    assert _put(s, make_record("junk/yy", VALUE, clock() + 1000), source=5)
    assert [bool(s.get(key_id_of(r.unpacked_key()))) for r in mine] == [False, True, True, True]


def test_subkeys_per_key_are_bounded_and_owned_ones_win_places(clock: FakeClock) -> None:
    s = _storage(clock, max_subkeys_per_key=4)
    kid = key_id_of("k")
    for i in range(4):
        assert _put(s, make_record("k", i, clock() + 10 + i, subkey=f"junk{i}"), source=1)
    assert not _put(s, make_record("k", 9, clock() + 99, subkey="junk9"), source=1)  # full, and its own
    # another sender holding less takes the heaviest sender's soonest-expiring subkey
    assert _put(s, make_record("k", 5, clock() + 50, subkey="other"), source=2)
    assert sorted(r.unpacked_subkey() for r in s.get(kid)) == ["junk1", "junk2", "junk3", "other"]
    # an owned subkey takes an unowned one's place; unowned ones never take an owned one's
    owners = [make_identity(10 + i) for i in range(4)]
    for owner in owners:
        rec = make_record("k", "me", clock() + 5, subkey=owner_subkey(owner.peer_id), identity=owner)
        assert _put(s, rec, source=10)
    assert all(r.unpacked_value() == "me" for r in s.get(kid)) and len(s.get(kid)) == 4
    assert not _put(s, make_record("k", 1, clock() + 99, subkey="junk-again"), source=3)


def test_a_plain_value_never_replaces_owner_signed_subkeys(clock: FakeClock) -> None:
    s = _storage(clock)
    owner = make_identity(1)
    mine = make_record("run/peers", {"stage": 0}, clock() + 30, subkey=owner_subkey(owner.peer_id), identity=owner)
    assert _put(s, mine, source=1)
    assert not _put(s, make_record("run/peers", "x", clock() + 6 * 86400), source=66)  # the attack
    assert s.get(key_id_of("run/peers")) == [mine]
    # and an owned subkey always takes the place of a plain value, whatever its expiration
    plain = make_record("other/peers", "x", clock() + 6 * 86400)
    assert _put(s, plain, source=66)
    renewed = make_record("other/peers", 1, clock() + 30, subkey=owner_subkey(owner.peer_id), identity=owner)
    assert _put(s, renewed, source=1) and s.get(key_id_of("other/peers")) == [renewed]
    # unowned dictionaries keep the old rule (a later plain value replaces them): see test_storage.py


def test_cached_copies_are_dropped_at_keep_until(clock: FakeClock) -> None:
    s = _storage(clock)
    r = make_record("k", 1, clock() + 100)
    assert s.put(key_id_of("k"), r, source=make_identity(1).peer_id, keep_until=clock() + 5)
    assert s.get(key_id_of("k")) == [r]
    clock.advance(6)
    assert s.get(key_id_of("k")) == [] and len(s) == 0 and s.size_bytes == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("budget_bytes", 0), ("max_share_per_source", 0.0), ("max_share_per_host", 1.5), ("preferred_prefixes", "run/")],
)
def test_bad_storage_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        StorageConfig(**{field: value})  # type: ignore[arg-type]
