"""Wire messages of reachability: the AutoNAT-style dial-back (``autonat.dial_back``) and the relay's
reservations (``relay.reserve``) and incoming circuits (``relay.incoming``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.p2p.messages import Message

MAX_DIAL_BACK_ADDRESSES = 8
MAX_SHARED_PEERS = 8


@dataclass(frozen=True, kw_only=True)
class DialBackRequest(Message):
    """``autonat.dial_back``: dial me back on these ``ports`` at the address you see me at, and at these
    ``maddrs`` (``--announce``) where their host is that address."""

    ports: list[int]
    maddrs: list[str]

    def __post_init__(self) -> None:
        if len(self.ports) + len(self.maddrs) > MAX_DIAL_BACK_ADDRESSES:
            raise ValueError(f"at most {MAX_DIAL_BACK_ADDRESSES} addresses to dial back")
        if any(not 0 < p <= 65535 for p in self.ports) or any(len(m) > 300 for m in self.maddrs):
            raise ValueError("ports must be in 1..65535 and maddrs at most 300 characters")


@dataclass(frozen=True, kw_only=True)
class DialBackReply(Message):
    """The addresses the peer dialled back successfully (its view of them), the address it sees us at, and a
    few other peers (direct multiaddrs) to ask next: a new node that knows one peer soon knows enough."""

    reachable: list[str]
    observed_host: str
    peers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.reachable) > MAX_DIAL_BACK_ADDRESSES or len(self.peers) > MAX_SHARED_PEERS:
            raise ValueError(f"at most {MAX_DIAL_BACK_ADDRESSES} addresses and {MAX_SHARED_PEERS} peers")


@dataclass(frozen=True, kw_only=True)
class ReserveRequest(Message):
    """``relay.reserve``: keep a reservation for me (renewed before ``ttl_s`` of the reply runs out)."""


@dataclass(frozen=True, kw_only=True)
class ReserveReply(Message):
    """``ttl_s`` > 0: reserved for that long. ``refused``: a code (``relay_unavailable``: this node is not
    confirmed public yet, an everyday answer while a swarm starts, so a reply rather than an error)."""

    ttl_s: float
    reservations: int  # how many peers hold one here now (relayed nodes spread over relays)
    refused: str = ""


@dataclass(frozen=True, kw_only=True)
class IncomingRequest(Message):
    """``relay.incoming`` (relay -> reserved peer): a dialler waits; connect back with this token."""

    token: bytes


@dataclass(frozen=True, kw_only=True)
class IncomingReply(Message):
    """The reserved peer opened the connection back to the relay."""
