"""Typed wire messages of the ``avg.*`` RPCs (matchmaking: join, begin, announce; the all-reduce streams) and the
entries of a group key in the DHT (`GroupEntry`, `GroupWithdrawal`, checked by `GROUP_SCHEMA`)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from swarm.dht.keys import AVERAGING_GROUP
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.p2p.identity import PEER_ID_SIZE_BYTES
from swarm.p2p.messages import Message

MAX_GROUP_KEY_CHARS = 512
MAX_GROUP_SIZE = 256
ROUND_ID_BYTES = 32
MAX_MADDRS = 16
MAX_GROUP_RECORD_TTL_S = 3600.0  # the longest a matchmaking entry may live (AveragerConfig.record_ttl_s)
STATE_DIGEST_BYTES = 32  # a member's SHA-256 of the weights it averages for (empty: it states none)


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
    state_digest: bytes = b""  # SHA-256 of the member's weights before this step (see `swarm.averaging.digests`)
    state_age_steps: int = 0  # steps the member applied since it last loaded its weights (the digest tie-break)

    def __post_init__(self) -> None:
        if len(self.peer_id) != PEER_ID_SIZE_BYTES:
            raise ValueError(f"peer_id must have {PEER_ID_SIZE_BYTES} bytes, got {len(self.peer_id)}")
        _check_member(self.maddrs, self.ready_at, self.weight, self.bandwidth)
        _check_digest(self.state_digest, self.state_age_steps)

    def rank(self) -> tuple[float, bytes]:
        """Order of members: earliest ready first, PeerID bytes break ties."""
        return (self.ready_at, self.peer_id)


def _check_digest(digest: bytes, age_steps: int) -> None:
    if len(digest) not in (0, STATE_DIGEST_BYTES):
        raise ValueError(f"state_digest must have 0 or {STATE_DIGEST_BYTES} bytes, got {len(digest)}")
    if age_steps < 0:
        raise ValueError(f"state_age_steps must be >= 0, got {age_steps}")


def _check_member(maddrs: tuple[str, ...], ready_at: float, weight: float, bandwidth: float | None) -> None:
    if len(maddrs) > MAX_MADDRS or any(len(m) > 512 for m in maddrs):
        raise ValueError(f"at most {MAX_MADDRS} maddrs of at most 512 characters")
    for name, value in (("ready_at", ready_at), ("weight", weight)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be finite and > 0 when given, got {bandwidth}")


@dataclass(frozen=True, kw_only=True)
class GroupEntry(Message):
    """A peer ready to average, under the group key (subkey ``[owner:<its PeerID>]``): a `MemberInfo` without
    the PeerID, which the owner subkey names."""

    ready_at: float = 0.0
    weight: float = 1.0
    bandwidth: float | None = None
    client_mode: bool = False
    maddrs: tuple[str, ...] = ()
    state_digest: bytes = b""
    state_age_steps: int = 0

    def __post_init__(self) -> None:
        _check_member(self.maddrs, self.ready_at, self.weight, self.bandwidth)
        _check_digest(self.state_digest, self.state_age_steps)

    @classmethod
    def of(cls, member: MemberInfo) -> GroupEntry:
        return cls(
            ready_at=member.ready_at,
            weight=member.weight,
            bandwidth=member.bandwidth,
            client_mode=member.client_mode,
            maddrs=member.maddrs,
            state_digest=member.state_digest,
            state_age_steps=member.state_age_steps,
        )

    def member(self, peer_id: bytes) -> MemberInfo:
        return MemberInfo(
            peer_id=peer_id,
            maddrs=self.maddrs,
            ready_at=self.ready_at,
            weight=self.weight,
            bandwidth=self.bandwidth,
            client_mode=self.client_mode,
            state_digest=self.state_digest,
            state_age_steps=self.state_age_steps,
        )


@dataclass(frozen=True, kw_only=True)
class GroupWithdrawal(Message):
    """What replaces a peer's `GroupEntry` once it is done with matchmaking: ``{"closed": true}``."""

    closed: bool

    def __post_init__(self) -> None:
        if self.closed is not True:
            raise ValueError("a withdrawal must say closed: true")


GROUP_SCHEMA = RecordSchema(
    key=AVERAGING_GROUP,
    kind=RecordKind.OWNED,
    value_types=(GroupEntry, GroupWithdrawal),
    max_ttl_s=MAX_GROUP_RECORD_TTL_S,
)


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
class AnnounceRequest(Message):
    """Direct matchmaking (`swarm.averaging.direct`): a peer ready under ``group_key`` tells each peer it expects in
    the group its entry (``member``, whose PeerID must be the caller's) and the whole membership it expects
    (``expected``: PeerID bytes, itself included). ``early``: sent ahead, before the peer is ready (its step is
    still open): it counts like any other, except that an expectation it states that differs is not final."""

    group_key: str
    member: MemberInfo
    expected: tuple[bytes, ...]
    early: bool = False

    def __post_init__(self) -> None:
        _check_key(self.group_key)
        if not 1 <= len(self.expected) <= MAX_GROUP_SIZE or len(set(self.expected)) != len(self.expected):
            raise ValueError(f"expected lists 1..{MAX_GROUP_SIZE} distinct peers, got {len(self.expected)}")
        if any(len(p) != PEER_ID_SIZE_BYTES for p in self.expected) or self.member.peer_id not in self.expected:
            raise ValueError("expected lists PeerIDs, the announcing member's among them")


@dataclass(frozen=True, kw_only=True)
class AnnounceReply(Message):
    taken: bool


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
