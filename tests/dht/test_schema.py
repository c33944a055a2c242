"""Typed record schemas: each refusal case on the checker, the reader's view, and on live DHT nodes."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

import pytest

from swarm.dht.keys import OWNER_PART_SUBKEY, KeyPattern, owner_subkey, part_subkey
from swarm.dht.records import RecordChecker, ValueWithExpiration, make_record
from swarm.dht.routing import key_id_of_packed
from swarm.dht.schema import RecordKind, RecordSchema, SchemaValidator
from swarm.errors import ConfigError, RecordError
from swarm.p2p.messages import Message, packb

from dht_testutil import dht_config, make_identity, swarm


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    step: int
    note: str = ""

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError("step must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Closed(Message):
    closed: bool


STATUS = RecordSchema(
    key=KeyPattern("status", re.compile(r"[^/]+/status")),
    kind=RecordKind.OWNED,
    value_types=(Status, Closed),
    max_ttl_s=60.0,
)
PARTS = RecordSchema(
    key=KeyPattern("parts", re.compile(r"[^/]+/parts/[0-9]+")),
    kind=RecordKind.OWNED,
    subkey=OWNER_PART_SUBKEY,
    value_types=(Status,),
    packed=True,
    max_ttl_s=600.0,
)
SETTING = RecordSchema(
    key=KeyPattern("setting", re.compile(r"settings/[^/]+")),
    kind=RecordKind.VALUE,
    value_types=(Status,),
    max_ttl_s=30.0,
)
SCHEMAS = (STATUS, PARTS, SETTING)


def _checker(clock: Any) -> RecordChecker:
    return RecordChecker(validators=(SchemaValidator(SCHEMAS, clock=clock, clock_skew_s=5.0),), clock=clock)


def test_good_records_of_each_kind_pass(clock: Any) -> None:
    me = make_identity(1)
    checker = _checker(clock)
    checker.check(
        make_record("r/status", Status(step=3).to_wire(), clock() + 60, owner_subkey(me.peer_id), identity=me)
    )
    checker.check(make_record("r/status", {"closed": True}, clock() + 10, owner_subkey(me.peer_id), identity=me))
    checker.check(
        make_record("r/parts/2", Status(step=1).pack(), clock() + 600, part_subkey(me.peer_id, 4), identity=me)
    )
    checker.check(make_record("settings/a", Status(step=0).to_wire(), clock() + 30))
    checker.check(make_record("unregistered/key", "anything", clock() + 3600))  # no schema, no schema check


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("plain value on an owned dictionary", "plain value is refused"),
        ("unowned subkey", "not an owner subkey"),
        ("owner subkey of the wrong shape", "not an owner subkey"),
        ("owned subkey with junk around it", "not an owner subkey"),
        ("value of another type", "is not a Status or Closed"),
        ("value failing its checks", "step must be >= 0"),
        ("expiration beyond the key's maximum", "exceeds this key's maximum of 60 s"),
        ("packed value that is a map", "must be packed bytes"),
        ("packed value that is garbage", "is not a Status"),
        ("subkey on a plain-value key", "holds one plain value"),
        ("plain-value key living too long", "maximum of 30 s"),
    ],
)
def test_each_refusal(clock: Any, case: str, match: str) -> None:
    me = make_identity(1)
    mine = owner_subkey(me.peer_id)
    good = Status(step=1).to_wire()
    records = {
        "plain value on an owned dictionary": lambda: make_record("r/status", "x", clock() + 10),
        "unowned subkey": lambda: make_record("r/status", good, clock() + 10, "x"),
        "owner subkey of the wrong shape": lambda: make_record(
            "r/status", good, clock() + 10, f"{mine}#0", identity=me
        ),
        "owned subkey with junk around it": lambda: make_record(
            "r/status", good, clock() + 10, f"a{mine}", identity=me
        ),
        "value of another type": lambda: make_record("r/status", {"role": "x"}, clock() + 10, mine, identity=me),
        "value failing its checks": lambda: make_record("r/status", {"step": -1}, clock() + 10, mine, identity=me),
        "expiration beyond the key's maximum": lambda: make_record("r/status", good, clock() + 66, mine, identity=me),
        "packed value that is a map": lambda: make_record("r/parts/1", good, clock() + 10, f"{mine}#0", identity=me),
        "packed value that is garbage": lambda: make_record(
            "r/parts/1", b"\x93x", clock() + 10, f"{mine}#0", identity=me
        ),
        "subkey on a plain-value key": lambda: make_record("settings/a", good, clock() + 10, "x"),
        "plain-value key living too long": lambda: make_record("settings/a", good, clock() + 36),
    }
    with pytest.raises(RecordError, match=re.escape(match)):
        _checker(clock).check(records[case]())


def test_schemas_are_checked_when_defined() -> None:
    with pytest.raises(ConfigError, match="max_ttl_s"):
        RecordSchema(key=STATUS.key, kind=RecordKind.OWNED, value_types=(Status,), max_ttl_s=0)
    with pytest.raises(ConfigError, match="Message classes"):
        RecordSchema(key=STATUS.key, kind=RecordKind.OWNED, value_types=(dict,), max_ttl_s=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="group 'owner'"):
        RecordSchema(key=STATUS.key, kind=RecordKind.OWNED, value_types=(Status,), max_ttl_s=1, subkey=re.compile("x"))
    with pytest.raises(ConfigError, match="registered already"):
        SchemaValidator((STATUS, STATUS))


def test_readers_skip_and_log_entries_that_break_the_schema(caplog: pytest.LogCaptureFixture) -> None:
    a, b = make_identity(1).peer_id, make_identity(2).peer_id
    found = {
        owner_subkey(a): ValueWithExpiration(Status(step=4).to_wire(), 1e12),
        owner_subkey(b): ValueWithExpiration({"step": "four"}, 1e12),
        "not-an-owner": ValueWithExpiration(Status(step=5).to_wire(), 1e12),
        "[owner:1111]": ValueWithExpiration(Status(step=6).to_wire(), 1e12),  # base58, but no PeerID
    }
    with caplog.at_level(logging.WARNING):
        entries = STATUS.entries(found)
        assert STATUS.entries(ValueWithExpiration("x", 1e12)) == []  # a plain value where a dictionary belongs
        assert STATUS.entries(None) == []
    assert [(e.owner, e.value, e.expiration_time) for e in entries] == [(a, Status(step=4), 1e12)]
    assert caplog.text.count("skipping an entry of status") == 3 and "found a plain value" in caplog.text
    assert [e.value for e in SETTING.entries(ValueWithExpiration(Status(step=2).to_wire(), 5.0))] == [Status(step=2)]


async def test_a_node_refuses_bad_stores_keeps_the_owned_ones_and_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node with the schemas refuses a plain value on an owned key (the issue-13 attack), an unowned subkey, a
    bad value and a too-long expiration from a client that skips every local check; its readers drop such
    records when an unchecked node serves them."""
    owner, attacker = make_identity(1), make_identity(2)
    async with swarm(0) as s:
        guarded = await s.add(dht_config(validators=(SchemaValidator(SCHEMAS),)))
        unchecked = await s.add()  # no schemas: an old or modified node that stores anything
        client = await s.add(dht_config(client_mode=True, initial_peers=(guarded.listen_maddrs[0],)))
        async with asyncio.timeout(30):
            now = guarded.config.clock()
            owned = make_record(
                "r/status", Status(step=7).to_wire(), now + 30, owner_subkey(owner.peer_id), identity=owner
            )
            assert await client.protocol.call_store(guarded.peer_id, [owned]) == [True]
            attacks = [
                make_record("r/status", "x", now + 600_000),
                make_record("r/status", Status(step=8).to_wire(), now + 30, "x"),
                make_record("r/status", "x", now + 30, owner_subkey(attacker.peer_id), identity=attacker),
                make_record(
                    "r/status", Status(step=9).to_wire(), now + 6000, owner_subkey(attacker.peer_id), identity=attacker
                ),
            ]
            with caplog.at_level(logging.WARNING):
                assert await client.protocol.call_store(guarded.peer_id, attacks) == [False] * 4
            assert caplog.text.count("rejected a record from") == 4
            stored = guarded.storage.get(key_id_of_packed(packb("r/status")))
            assert stored == [owned]
            # the unchecked node keeps the plain value; the guarded node's get drops it when that node serves it
            assert await client.protocol.call_store(unchecked.peer_id, [attacks[0]]) == [True]
            contact = next(c for c in guarded.table.contacts() if c.peer_id == unchecked.peer_id)
            with caplog.at_level(logging.WARNING):
                records, _, _ = await guarded.protocol.call_find_value(contact, packb("r/status"))
            assert records == [] and "dropping a record from" in caplog.text
            found = await guarded.get("r/status", latest=True)
            assert isinstance(found, dict) and found[owner_subkey(owner.peer_id)].value == Status(step=7).to_wire()
            assert (await client.protocol.call_ping(guarded.peer_id)) is not None  # still serving
