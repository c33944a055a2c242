"""avg.* messages: round trips, checks at the edge, round ids."""

from __future__ import annotations

import pytest

from swarm.p2p.identity import Identity
from swarm.p2p.messages import packb
from swarm.averaging.messages import (
    BeginRequest,
    JoinRequest,
    MemberInfo,
    PartHeader,
    ReadyHint,
    ReadyHintReply,
    ResultRequest,
    round_id_of,
)
from swarm.errors import ProtocolError


def _member(i: int, **kw: object) -> MemberInfo:
    peer = Identity.from_seed(bytes([i + 1]) * 32).peer_id
    return MemberInfo(peer_id=peer.to_bytes(), maddrs=("/ip4/127.0.0.1/tcp/1",), ready_at=float(i), **kw)  # type: ignore[arg-type]


def test_round_trips() -> None:
    members = (_member(0, bandwidth=10.0), _member(1, client_mode=True, weight=3.0))
    rid = round_id_of("run/avg/0/1", members)
    for msg in (
        JoinRequest(group_key="run/avg/0/1", leader=members[0]),
        BeginRequest(group_key="run/avg/0/1", round_id=rid, members=members),
        PartHeader(group_key="k", round_id=rid, weight=2.0),
        ResultRequest(group_key="k", round_id=rid),
        ReadyHint(group_key="run/avg/0/1"),
        ReadyHintReply(woken=True),
    ):
        assert type(msg).unpack(msg.pack()) == msg


def test_round_id_depends_on_key_and_order() -> None:
    a, b = _member(0), _member(1)
    assert round_id_of("k", (a, b)) != round_id_of("k", (b, a))
    assert round_id_of("k", (a, b)) != round_id_of("k2", (a, b))
    assert round_id_of("k", (a, b)) == round_id_of("k", (_member(0), _member(1)))


@pytest.mark.parametrize(
    "wire",
    [
        {"group_key": "k", "round_id": b"short", "weight": 1.0},
        {"group_key": "k", "round_id": b"x" * 32, "weight": -1.0},
        {"group_key": "k", "round_id": b"x" * 32, "weight": float("nan")},
        {"group_key": "", "round_id": b"x" * 32, "weight": 1.0},
        {"group_key": "k", "round_id": b"x" * 32, "weight": "heavy"},
        {"group_key": "k", "round_id": b"x" * 32, "weight": 1.0, "extra": 1},
    ],
)
def test_part_header_rejects_bad_input(wire: dict) -> None:
    with pytest.raises(ProtocolError):
        PartHeader.unpack(packb(wire))


def test_begin_rejects_duplicate_members_and_bad_member_fields() -> None:
    m = _member(0)
    with pytest.raises(ProtocolError, match="twice"):
        BeginRequest.from_wire({"group_key": "k", "round_id": b"x" * 32, "members": [m.to_wire(), m.to_wire()]})
    with pytest.raises(ProtocolError, match="peer_id"):
        MemberInfo.from_wire({**m.to_wire(), "peer_id": b"abc"})
    with pytest.raises(ProtocolError, match="bandwidth"):
        MemberInfo.from_wire({**m.to_wire(), "bandwidth": 0.0})


def test_ready_hint_rejects_a_bad_key() -> None:
    for wire in ({"group_key": ""}, {"group_key": 5}, {}):
        with pytest.raises(ProtocolError):
            ReadyHint.unpack(packb(wire))
