"""The DHT's wire messages: one request and one reply type per method, and peers as ``NodeInfo``.

Every request names its ``sender`` (PeerID bytes and listen multiaddrs) unless the caller is in client mode.
Sizes are checked when a message is decoded: at most ``MAX_MADDRS_PER_PEER`` multiaddrs per peer and
``MAX_PEERS_PER_REPLY`` peers per message; IDs are ``ID_BYTES`` long; cursors at most ``MAX_CURSOR_BYTES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarm.p2p.messages import Message
from swarm.dht.paging import MAX_CURSOR_BYTES
from swarm.dht.records import Record
from swarm.dht.routing import ID_BYTES, Contact

MAX_MADDRS_PER_PEER = 8
MAX_PEERS_PER_REPLY = 1000


@dataclass(frozen=True, kw_only=True)
class NodeInfo(Message):
    """A peer on the wire: PeerID bytes and its listen multiaddrs."""

    peer_id: bytes
    maddrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.maddrs) > MAX_MADDRS_PER_PEER or any(len(m) > 300 for m in self.maddrs):
            raise ValueError(f"at most {MAX_MADDRS_PER_PEER} multiaddrs of <= 300 characters per peer")


def _check_peers(peers: Sequence[NodeInfo]) -> None:
    if len(peers) > MAX_PEERS_PER_REPLY:
        raise ValueError(f"at most {MAX_PEERS_PER_REPLY} peers per message, got {len(peers)}")


@dataclass(frozen=True, kw_only=True)
class PingRequest(Message):
    sender: NodeInfo | None = None


@dataclass(frozen=True, kw_only=True)
class PingReply(Message):
    peer: NodeInfo


@dataclass(frozen=True, kw_only=True)
class FindNodeRequest(Message):
    sender: NodeInfo | None = None
    target: bytes

    def __post_init__(self) -> None:
        if len(self.target) != ID_BYTES:
            raise ValueError(f"target must be a {ID_BYTES}-byte ID, got {len(self.target)} bytes")


@dataclass(frozen=True, kw_only=True)
class FindNodeReply(Message):
    peers: tuple[NodeInfo, ...] = ()

    def __post_init__(self) -> None:
        _check_peers(self.peers)


@dataclass(frozen=True, kw_only=True)
class FindValueRequest(Message):
    sender: NodeInfo | None = None
    key: bytes  # the msgpack form of the key
    cursor: bytes = b""  # b"": the first page; else the next_cursor of the previous reply

    def __post_init__(self) -> None:
        if len(self.cursor) > MAX_CURSOR_BYTES:
            raise ValueError(f"cursor longer than {MAX_CURSOR_BYTES} bytes")


@dataclass(frozen=True, kw_only=True)
class FindValueReply(Message):
    records: tuple[Record, ...] = ()
    peers: tuple[NodeInfo, ...] = ()
    next_cursor: bytes = b""  # b"": no more records; else send it back for the next page

    def __post_init__(self) -> None:
        _check_peers(self.peers)
        if len(self.next_cursor) > MAX_CURSOR_BYTES:
            raise ValueError(f"next_cursor longer than {MAX_CURSOR_BYTES} bytes")


@dataclass(frozen=True, kw_only=True)
class StoreRequest(Message):
    sender: NodeInfo | None = None
    records: tuple[Record, ...]


@dataclass(frozen=True, kw_only=True)
class StoreReply(Message):
    stored: tuple[bool, ...]


@dataclass(frozen=True, kw_only=True)
class RoutingTableRequest(Message):
    pass


@dataclass(frozen=True, kw_only=True)
class RoutingTableReply(Message):
    peer: NodeInfo
    client_mode: bool
    peers: tuple[NodeInfo, ...] = ()
    buckets: tuple[int, ...] = ()
    num_records: int = 0

    def __post_init__(self) -> None:
        _check_peers(self.peers)
        if len(self.buckets) != len(self.peers):
            raise ValueError("buckets must have one entry per peer")


def to_info(contact: Contact) -> NodeInfo:
    return NodeInfo(peer_id=contact.peer_id.to_bytes(), maddrs=contact.maddrs)
