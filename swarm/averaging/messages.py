"""Typed wire messages of the ``avg.*`` RPCs: matchmaking (join, begin) and the all-reduce streams."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from swarm.p2p.identity import PEER_ID_SIZE_BYTES
from swarm.p2p.messages import Message

MAX_GROUP_KEY_CHARS = 512
MAX_GROUP_SIZE = 256
ROUND_ID_BYTES = 32
MAX_MADDRS = 16


def _check_key(group_key: str) -> None:
    if not 0 < len(group_key) <= MAX_GROUP_KEY_CHARS:
        raise ValueError(f"group_key must have 1..{MAX_GROUP_KEY_CHARS} characters, got {len(group_key)}")


def _check_round(round_id: bytes) -> None:
    if len(round_id) != ROUND_ID_BYTES:
        raise ValueError(f"round_id must have {ROUND_ID_BYTES} bytes, got {len(round_id)}")


@dataclass(frozen=True, kw_only=True)
class MemberInfo(Message):
    """One member of a group as announced in the DHT: who, where, when ready, how much it weighs and reduces."""

    peer_id: bytes
    maddrs: tuple[str, ...] = ()
    ready_at: float = 0.0
    weight: float = 1.0
    bandwidth: float | None = None
    client_mode: bool = False

    def __post_init__(self) -> None:
        if len(self.peer_id) != PEER_ID_SIZE_BYTES:
            raise ValueError(f"peer_id must have {PEER_ID_SIZE_BYTES} bytes, got {len(self.peer_id)}")
        if len(self.maddrs) > MAX_MADDRS or any(len(m) > 512 for m in self.maddrs):
            raise ValueError(f"at most {MAX_MADDRS} maddrs of at most 512 characters")
        for name in ("ready_at", "weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.bandwidth is not None and not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be finite and > 0 when given, got {self.bandwidth}")

    def rank(self) -> tuple[float, bytes]:
        """Order of members: earliest ready first, PeerID bytes break ties."""
        return (self.ready_at, self.peer_id)


def round_id_of(group_key: str, members: tuple[MemberInfo, ...]) -> bytes:
    """The id every member derives from the same key and ordered membership (SHA-256)."""
    h = hashlib.sha256(group_key.encode())
    for m in members:
        h.update(m.pack())
    return h.digest()


@dataclass(frozen=True, kw_only=True)
class JoinRequest(Message):
    """A leader asks a peer to join its group under ``group_key``."""

    group_key: str
    leader: MemberInfo

    def __post_init__(self) -> None:
        _check_key(self.group_key)


@dataclass(frozen=True, kw_only=True)
class JoinReply(Message):
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ReadyHint(Message):
    """A peer that just announced itself under ``group_key`` tells the peer ranked first to re-read the key now
    (instead of at its next poll), so the group closes one round trip after the last member is ready."""

    group_key: str

    def __post_init__(self) -> None:
        _check_key(self.group_key)


@dataclass(frozen=True, kw_only=True)
class ReadyHintReply(Message):
    woken: bool


@dataclass(frozen=True, kw_only=True)
class BeginRequest(Message):
    """The leader's final, ordered membership; every member starts the all-reduce with exactly this list."""

    group_key: str
    round_id: bytes
    members: tuple[MemberInfo, ...]

    def __post_init__(self) -> None:
        _check_key(self.group_key)
        _check_round(self.round_id)
        if not 1 <= len(self.members) <= MAX_GROUP_SIZE:
            raise ValueError(f"a group has 1..{MAX_GROUP_SIZE} members, got {len(self.members)}")
        if len({m.peer_id for m in self.members}) != len(self.members):
            raise ValueError("a group lists the same peer twice")


@dataclass(frozen=True, kw_only=True)
class BeginReply(Message):
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class PartHeader(Message):
    """Opens ``avg.part``: the sender's parts of the owner's span follow as chunks, one part per chunk, in order."""

    group_key: str
    round_id: bytes
    weight: float

    def __post_init__(self) -> None:
        _check_key(self.group_key)
        _check_round(self.round_id)
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class PartAck(Message):
    parts_received: int


@dataclass(frozen=True, kw_only=True)
class ResultRequest(Message):
    """Opens ``avg.result``: the owner streams back its reduced span, one part per chunk, in order."""

    group_key: str
    round_id: bytes

    def __post_init__(self) -> None:
        _check_key(self.group_key)
        _check_round(self.round_id)


@dataclass(frozen=True, kw_only=True)
class ResultHeader(Message):
    num_parts: int
