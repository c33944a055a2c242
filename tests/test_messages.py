"""Typed messages: round trips, and every mismatch in peer bytes becomes a ProtocolError."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from swarm.p2p.messages import Message, packb, unpackb
from swarm.errors import ProtocolError


@dataclass(frozen=True, kw_only=True)
class Inner(Message):
    name: str
    weight: float = 1.0


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, kw_only=True)
class Outer(Message):
    count: int
    color: Color
    flag: bool
    blob: bytes
    inner: Inner
    items: tuple[int, ...] = ()
    pairs: list[Inner] = ()  # type: ignore[assignment]
    table: dict[str, int] | None = None
    maybe: str | None = None
    anything: Any = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def _outer() -> Outer:
    return Outer(
        count=3,
        color=Color.RED,
        flag=True,
        blob=b"\x00\xff",
        inner=Inner(name="a"),
        items=(1, 2),
        pairs=[Inner(name="b", weight=2.5)],
        table={"k": 1},
        maybe="m",
        anything=[1, "x"],
    )


def test_round_trip() -> None:
    message = _outer()
    assert Outer.unpack(message.pack()) == message
    assert Outer.unpack(Outer(count=0, color=Color.BLUE, flag=False, blob=b"", inner=Inner(name="")).pack()).items == ()


def test_str_enums_travel_as_their_strings() -> None:
    wire = unpackb(_outer().pack())
    assert wire["color"] == "red" and type(wire["color"]) is str
    assert type(Outer.unpack(_outer().pack()).color) is Color


def test_ints_are_accepted_as_floats() -> None:
    assert Inner.unpack(packb({"name": "x", "weight": 2})).weight == 2.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"count": "3"}, "Outer.count: expected int"),
        ({"count": True}, "Outer.count: expected int"),
        ({"flag": 1}, "expected bool"),
        ({"blob": "text"}, "expected bytes"),
        ({"inner": {"name": 5}}, "Inner.name: expected str"),
        ({"inner": [1]}, "expected a map"),
        ({"items": [1, "2"]}, r"items\[1\]"),
        ({"table": {"k": "v"}}, "table"),
        ({"maybe": 5}, "does not match"),
        ({"count": -1}, "count must be >= 0"),
        ({"color": "green"}, r"Outer.color: expected one of \['red', 'blue'\]"),
        ({"color": 1}, "Outer.color: expected one of"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_mismatches_raise_protocol_error(change: dict[str, Any], match: str) -> None:
    wire = _outer().to_wire()
    wire.update(change)
    with pytest.raises(ProtocolError, match=match):
        Outer.unpack(packb(wire))


def test_missing_field_and_non_map() -> None:
    wire = _outer().to_wire()
    del wire["count"]
    with pytest.raises(ProtocolError, match="missing field 'count'"):
        Outer.from_wire(wire)
    with pytest.raises(ProtocolError, match="expected a map"):
        Outer.unpack(packb([1, 2]))


def test_malformed_and_oversized_msgpack() -> None:
    for data in (b"\xc1", b"\x92\x01", packb(1) + b"\x00", b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError, match="malformed msgpack"):
            unpackb(data)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        unpackb(packb("x" * 100), max_size_bytes=50)


def test_never_pickle() -> None:
    ext = msgpack.packb(msgpack.ExtType(1, b"\x80\x04"))  # an ext type is data, never executed or unpickled
    assert isinstance(unpackb(ext), msgpack.ExtType)
