"""Kademlia routing: node IDs, XOR distance, k-buckets with a replacement cache.

A node ID is the SHA-256 of the PeerID bytes (the PeerID is itself the public key), so nobody can pick
their position in the ID space. Per the Kademlia paper (section 2.2) a node keeps one list ("k-bucket")
for each distance range ``[2**i, 2**(i+1))``, ``0 <= i < ID_BITS``, holding at most ``k`` contacts ordered
least-recently-seen first. A contact seen again moves to the tail. When a full bucket meets a new
contact, the new one waits in the bucket's replacement cache while the caller pings the least-recently
seen contact: if it answers it stays (and moves to the tail), if not it is evicted and the most recently
seen replacement takes its place (:meth:`RoutingTable.add` returns the contact to ping).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import packb
from swarm.errors import ConfigError

ID_BITS = 256
ID_BYTES = ID_BITS // 8


def node_id_of(peer_id: PeerID) -> int:
    """The Kademlia ID of a peer: SHA-256 of its PeerID bytes, as an int."""
    return int.from_bytes(hashlib.sha256(peer_id.to_bytes()).digest(), "big")


def key_id_of(key: str | bytes) -> int:
    """The Kademlia ID of a DHT key: SHA-256 of its msgpack form (so "a" and b"a" differ)."""
    return key_id_of_packed(packb(key))


def key_id_of_packed(key_bytes: bytes) -> int:
    """The Kademlia ID of a key already in msgpack form."""
    return int.from_bytes(hashlib.sha256(key_bytes).digest(), "big")


def id_to_bytes(node_id: int) -> bytes:
    return node_id.to_bytes(ID_BYTES, "big")


def id_from_bytes(raw: bytes) -> int:
    if len(raw) != ID_BYTES:
        raise ValueError(f"a DHT ID has {ID_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def distance(a: int, b: int) -> int:
    """XOR distance between two IDs."""
    return a ^ b


@dataclass(frozen=True)
class Contact:
    """A peer the routing table knows: its PeerID, derived node ID and listen multiaddrs."""

    peer_id: PeerID
    maddrs: tuple[str, ...] = ()
    node_id: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if self.node_id < 0:
            object.__setattr__(self, "node_id", node_id_of(self.peer_id))


@dataclass
class KBucket:
    """Up to ``k`` contacts, least-recently-seen first, plus a bounded replacement cache."""

    size: int
    contacts: OrderedDict[PeerID, Contact] = field(default_factory=OrderedDict)
    replacements: OrderedDict[PeerID, Contact] = field(default_factory=OrderedDict)
    last_updated_s: float = 0.0

    def is_full(self) -> bool:
        return len(self.contacts) >= self.size

    def least_recently_seen(self) -> Contact | None:
        return next(iter(self.contacts.values()), None)

    def add_replacement(self, contact: Contact) -> None:
        self.replacements.pop(contact.peer_id, None)
        self.replacements[contact.peer_id] = contact
        while len(self.replacements) > self.size:
            self.replacements.popitem(last=False)


class RoutingTable:
    """The k-buckets of one node. Not thread-safe; used from the node's event loop only."""

    def __init__(self, local_id: int, *, bucket_size: int = 20, clock: Callable[[], float] | None = None) -> None:
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise ConfigError(f"bucket_size must be an int >= 1, got {bucket_size!r}")
        self.local_id = local_id
        self.bucket_size = bucket_size
        self._clock = clock or (lambda: 0.0)
        self.buckets = [KBucket(bucket_size) for _ in range(ID_BITS)]
        self._index: dict[PeerID, int] = {}
        self._all: dict[PeerID, Contact] = {}  # every contact of every bucket, for fast scans

    def bucket_index(self, node_id: int) -> int:
        """Index ``i`` of the bucket covering distances ``[2**i, 2**(i+1))`` from the local ID."""
        d = distance(self.local_id, node_id)
        if d == 0:
            raise ValueError("the local node has no bucket for itself")
        return d.bit_length() - 1

    def add(self, contact: Contact) -> Contact | None:
        """Record that ``contact`` was seen. Return the least-recently-seen contact to ping if the bucket is
        full (``contact`` then waits in the replacement cache), else None."""
        if contact.node_id == self.local_id:
            return None
        i = self.bucket_index(contact.node_id)
        bucket = self.buckets[i]
        bucket.last_updated_s = self._clock()
        if contact.peer_id in bucket.contacts:
            old = bucket.contacts.pop(contact.peer_id)
            bucket.contacts[contact.peer_id] = self._all[contact.peer_id] = contact if contact.maddrs else old
            return None
        if not bucket.is_full():
            bucket.contacts[contact.peer_id] = self._all[contact.peer_id] = contact
            bucket.replacements.pop(contact.peer_id, None)
            self._index[contact.peer_id] = i
            return None
        bucket.add_replacement(contact)
        return bucket.least_recently_seen()

    def remove(self, peer_id: PeerID) -> Contact | None:
        """Evict a contact that failed to answer; promote the most recent replacement. Return the promoted one."""
        i = self._index.pop(peer_id, None)
        if i is None:
            for bucket in self.buckets:  # it may be waiting in a replacement cache
                bucket.replacements.pop(peer_id, None)
            return None
        bucket = self.buckets[i]
        del bucket.contacts[peer_id]
        del self._all[peer_id]
        if not bucket.replacements:
            return None
        _, promoted = bucket.replacements.popitem(last=True)
        bucket.contacts[promoted.peer_id] = self._all[promoted.peer_id] = promoted
        self._index[promoted.peer_id] = i
        return promoted

    def get(self, peer_id: PeerID) -> Contact | None:
        return self._all.get(peer_id)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def contacts(self) -> list[Contact]:
        return list(self._all.values())

    def nearest(self, target_id: int, k: int, *, exclude: Iterable[PeerID] = ()) -> list[Contact]:
        """The ``k`` known contacts closest to ``target_id`` by XOR distance, closest first."""
        excluded = set(exclude)
        candidates = (c for c in self._all.values() if c.peer_id not in excluded)
        return heapq.nsmallest(k, candidates, key=lambda c: c.node_id ^ target_id)

    def stale_buckets(self, now_s: float, refresh_interval_s: float) -> list[int]:
        """Indices of buckets not updated within ``refresh_interval_s``, from the closest non-empty range out."""
        nonempty = [i for i, b in enumerate(self.buckets) if b.contacts]
        if not nonempty:
            return []
        return [
            i for i in range(min(nonempty), ID_BITS) if now_s - self.buckets[i].last_updated_s >= refresh_interval_s
        ]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> int:
        """A random ID whose distance from the local ID falls in bucket ``index`` (for bucket refresh)."""
        if not 0 <= index < ID_BITS:
            raise ValueError(f"bucket index must be in [0, {ID_BITS}), got {index}")
        offset = (1 << index) | rng.getrandbits(index) if index else 1
        return self.local_id ^ offset

    def mark_refreshed(self, index: int) -> None:
        self.buckets[index].last_updated_s = self._clock()
