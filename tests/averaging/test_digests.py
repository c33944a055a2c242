"""Replica digests (`swarm.averaging.digests`): the digest majority rule and the digest carried in group entries."""

from __future__ import annotations

import pytest
import torch

from swarm.averaging.digests import digest_majority, weights_digest
from swarm.averaging.messages import GroupEntry, MemberInfo
from swarm.errors import ProtocolError
from swarm.p2p.identity import Identity

IDS = [Identity.from_seed(bytes([i + 1]) * 32).peer_id for i in range(5)]
GOOD, BAD, OTHER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def member(i: int, digest: bytes, age: int = 0) -> MemberInfo:
    return MemberInfo(peer_id=IDS[i].to_bytes(), state_digest=digest, state_age_steps=age)


def test_weights_digest_is_equal_only_for_bit_identical_tensors() -> None:
    a = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)]
    same = [t.clone() for t in a]
    assert weights_digest(a) == weights_digest(same) and len(weights_digest(a)) == 32
    nudged = [a[0].clone(), torch.nextafter(a[1], torch.full_like(a[1], 2.0))]
    assert weights_digest(nudged) != weights_digest(a)
    assert weights_digest([a[0].reshape(3, 2), a[1]]) != weights_digest(a)  # the shape counts
    assert weights_digest([a[0].double(), a[1]]) != weights_digest(a)  # and the dtype


def test_the_digest_held_by_most_members_wins() -> None:
    verdict = digest_majority([member(0, BAD, age=100), member(1, GOOD), member(2, GOOD)])
    assert verdict is not None
    assert verdict.majority == GOOD and set(verdict.holders) == {IDS[1], IDS[2]}
    assert verdict.dissenters == (IDS[0],)
    assert not verdict.agrees(IDS[0]) and verdict.agrees(IDS[1])


def test_a_tie_goes_to_the_oldest_weights_then_the_smallest_peer_id() -> None:
    """Two replicas, one just restarted (age 0): the one that trained along (age 40) keeps its weights."""
    for fresh, trained in ((0, 1), (1, 0)):
        verdict = digest_majority([member(fresh, BAD, age=0), member(trained, GOOD, age=40)])
        assert verdict is not None and verdict.majority == GOOD and verdict.dissenters == (IDS[fresh],)
    same_age = digest_majority([member(3, BAD, age=5), member(2, GOOD, age=5)])
    smallest = min((2, 3), key=lambda i: IDS[i].to_bytes())
    assert same_age is not None and same_age.holders == (IDS[smallest],)


def test_holders_are_ranked_as_sources_oldest_first() -> None:
    verdict = digest_majority([member(0, GOOD, age=1), member(1, GOOD, age=9), member(2, OTHER, age=50)])
    assert verdict is not None and verdict.holders == (IDS[1], IDS[0])


def test_members_without_a_digest_neither_vote_nor_dissent() -> None:
    assert digest_majority([member(0, GOOD), member(1, b"")]) is None
    assert digest_majority([member(0, GOOD)]) is None
    verdict = digest_majority([member(0, GOOD), member(1, GOOD), member(2, b"")])
    assert verdict is not None and verdict.dissenters == () and verdict.agrees(IDS[2])


def test_group_entries_carry_the_digest_and_check_it() -> None:
    info = member(0, GOOD, age=7)
    entry = GroupEntry.from_wire(GroupEntry.of(info).to_wire())
    assert entry.member(IDS[0].to_bytes()) == info
    with pytest.raises(ProtocolError):
        GroupEntry.from_wire({**GroupEntry.of(info).to_wire(), "state_digest": b"short"})
    with pytest.raises(ProtocolError):
        GroupEntry.from_wire({**GroupEntry.of(info).to_wire(), "state_age_steps": -1})
