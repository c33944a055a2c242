"""Records: packing, owner markers, signatures (forged, unsigned, tampered), validators, limits."""

from __future__ import annotations

import dataclasses

import pytest

from swarm.p2p.messages import packb
from swarm.dht.keys import owner_subkey
from swarm.dht.records import (
    OwnerSignatureValidator,
    Record,
    RecordChecker,
    make_record,
    record_owner,
)
from swarm.errors import RecordError

from dht_testutil import make_identity


def _checker(clock, **kw) -> RecordChecker:  # type: ignore[no-untyped-def]
    return RecordChecker(clock=clock, **kw)


def test_plain_record_round_trip(clock) -> None:  # type: ignore[no-untyped-def]
    rec = make_record("k", {"a": [1, 2]}, clock() + 10)
    again = Record.unpack(rec.pack())
    assert again == rec
    assert again.with_value().value == {"a": [1, 2]}
    _checker(clock).check(again)


def test_owned_record_signed_and_checked(clock) -> None:  # type: ignore[no-untyped-def]
    me, other = make_identity(1), make_identity(2)
    sub = owner_subkey(me.peer_id)
    rec = make_record("run/peers", {"role": "stage"}, clock() + 10, subkey=sub, identity=me)
    assert record_owner(rec) == me.peer_id
    _checker(clock).check(rec)
    # owned key (marker in the key itself) also works
    _checker(clock).check(make_record(f"x/{sub}", 1, clock() + 10, identity=me))
    with pytest.raises(RecordError, match="only that peer"):
        make_record("run/peers", 1, clock() + 10, subkey=sub, identity=other)


@pytest.mark.parametrize("attack", ["unsigned", "forged", "tampered_value", "tampered_expiration", "two_owners"])
def test_bad_owned_records_rejected(clock, attack: str) -> None:  # type: ignore[no-untyped-def]
    me, mallory = make_identity(1), make_identity(3)
    rec = make_record("k", 1, clock() + 10, subkey=owner_subkey(me.peer_id), identity=me)
    if attack == "unsigned":
        rec = dataclasses.replace(rec, signature=b"")
    elif attack == "forged":
        rec = dataclasses.replace(rec, signature=mallory.sign(rec.signing_payload()))
    elif attack == "tampered_value":
        rec = dataclasses.replace(rec, value=packb(2))
    elif attack == "tampered_expiration":
        rec = dataclasses.replace(rec, expiration_time=rec.expiration_time + 5)
    else:
        rec = make_record(f"k{owner_subkey(mallory.peer_id)}", 1, clock() + 10, identity=mallory)
        rec = dataclasses.replace(rec, subkey=packb(owner_subkey(me.peer_id)))
    with pytest.raises(RecordError):
        _checker(clock).check(rec)


def test_expiry_ttl_and_size_limits(clock) -> None:  # type: ignore[no-untyped-def]
    checker = _checker(clock, max_value_size_bytes=100, max_ttl_s=60.0, clock_skew_s=5.0)
    with pytest.raises(RecordError, match="expired"):
        checker.check(make_record("k", 1, clock() - 1))
    with pytest.raises(RecordError, match="max_ttl_s"):
        checker.check(make_record("k", 1, clock() + 66))
    checker.check(make_record("k", 1, clock() + 64))  # within ttl + skew
    with pytest.raises(RecordError, match="max_value_size_bytes"):
        checker.check(make_record("k", "x" * 200, clock() + 10))
    with pytest.raises(RecordError, match="str or bytes"):
        checker.check(dataclasses.replace(make_record("k", 1, clock() + 10), key=packb(5)))
    with pytest.raises(RecordError, match="msgpack"):
        checker.check(dataclasses.replace(make_record("k", 1, clock() + 10), value=b"\xc1"))


class _EvenOnly:
    """A schema: values must be even ints; the larger value wins."""

    def validate(self, record: Record) -> None:
        value = record.unpacked_value()
        if not isinstance(value, int) or value % 2:
            raise RecordError("value must be an even int")

    def select(self, current: Record, candidate: Record) -> Record | None:
        return candidate if candidate.unpacked_value() > current.unpacked_value() else current


def test_validator_protocol_round_trip(clock) -> None:  # type: ignore[no-untyped-def]
    checker = _checker(clock, validators=(_EvenOnly(),))
    small, big = make_record("k", 2, clock() + 50), make_record("k", 4, clock() + 10)
    checker.check(small)
    checker.check(big)
    with pytest.raises(RecordError, match="even"):
        checker.check(make_record("k", 3, clock() + 10))
    assert checker.select(small, big) is big and checker.select(big, small) is big
    # the default rule: later expiration wins
    plain = _checker(clock)
    assert plain.select(small, big) is small and plain.select(big, small) is small
    assert OwnerSignatureValidator().select(small, big) is None
