"""Replica digests: each member of an averaging group states a SHA-256 of the weights it averages for, and the
group's majority decides which weights are the stage's (see docs/averaging.md, "Replica digests").

The members of a group under one step's key are replicas of one stage at one step; they must hold bit-identical
weights, since the all-reduce averages gradients and a weight difference would never heal. Each states its digest
(and the age of its weights, in steps) in its matchmaking entry, so the leader's final membership carries one digest
per member per step, covered by the round id. The rule (`digest_majority`):

1. Members that state no digest neither vote nor dissent.
2. The digest held by the most members wins.
3. A tie goes to the digest whose holders include the oldest weights (the highest ``state_age_steps``: a replica
   that has trained along with the swarm longest, not one that just loaded a checkpoint), then to the digest held
   by the smallest PeerID.

A member whose digest lost takes a winner's state (the caller downloads it) instead of applying its own update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from swarm.averaging.messages import MemberInfo
from swarm.p2p.identity import PeerID


def weights_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA-256 of ``tensors`` in order: dtype, shape and raw bytes of each (equal digests: bit-identical)."""
    h = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        h.update(f"{data.dtype}{tuple(data.shape)}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


@dataclass(frozen=True, kw_only=True)
class DigestVerdict:
    """The group's decision: the winning digest, who holds it (best source of its state first: oldest weights,
    then smallest PeerID) and who holds another."""

    majority: bytes
    holders: tuple[PeerID, ...]
    dissenters: tuple[PeerID, ...]

    def agrees(self, peer: PeerID) -> bool:
        """Whether ``peer`` holds the winning weights (a member that stated no digest is not judged)."""
        return peer not in self.dissenters


def digest_majority(members: Sequence[MemberInfo]) -> DigestVerdict | None:
    """Apply the rule (module docstring) to a group's members; None when fewer than two stated a digest."""
    voters = [m for m in members if m.state_digest]
    if len(voters) < 2:
        return None
    by_digest: dict[bytes, list[MemberInfo]] = {}
    for m in voters:
        by_digest.setdefault(m.state_digest, []).append(m)

    def strength(item: tuple[bytes, list[MemberInfo]]) -> tuple[int, int, bytes]:
        holders = item[1]
        # most holders, then the oldest weights, then the smallest PeerID (negated for max())
        smallest = min(m.peer_id for m in holders)
        return (len(holders), max(m.state_age_steps for m in holders), bytes(255 - b for b in smallest))

    majority, holders = max(by_digest.items(), key=strength)
    ranked = sorted(holders, key=lambda m: (-m.state_age_steps, m.peer_id))
    return DigestVerdict(
        majority=majority,
        holders=tuple(PeerID(m.peer_id) for m in ranked),
        dissenters=tuple(
            PeerID(m.peer_id) for m in sorted(voters, key=lambda m: m.peer_id) if m.state_digest != majority
        ),
    )
