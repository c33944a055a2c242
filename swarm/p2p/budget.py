"""Connection budgets: which connection may take a slot, which one gives its slot up, which peers are protected.

Two budgets, each with a per-source-address cap (loopback is an address like any other):

- **pending**: inbound connections still in the handshake, at most ``max_pending_connections`` and
  ``max_pending_per_ip`` from one source. A source over its cap is refused; when the budget is full, the
  newcomer evicts the oldest pending connection of the source holding the most pending slots.
- **established**: at most ``max_connections`` (both directions, outbound dials in progress included), of
  which ``max_connections_per_ip`` inbound ones from one source; ``reserved_connections`` of them only
  protected peers may take. When full, the newcomer evicts the least useful inbound connection: open, no
  request or stream in flight, its peer not protected, the oldest last activity first (keep-alive PINGs are
  not activity). If no connection may go, the newcomer is refused, told "at its connection limit".

A source is the IPv4 address, or the /64 network of an IPv6 one. Protected peers (``protect(peer, tag)``) are
never evicted and are exempt from the per-source cap of established connections. This module decides; the
transport closes victims and sends refusals.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.identity import PeerID


@dataclass(frozen=True, slots=True)
class Verdict:
    """``admit`` the newcomer or not; ``victim`` is closed first. ``limit`` names the config field that was hit,
    ``reason`` says why the newcomer is refused or the victim evicted."""

    admit: bool
    victim: Connection | None = None
    limit: str = ""
    reason: str = ""


ADMIT = Verdict(admit=True)


def source_of(host: str) -> str:
    """The per-source key of a remote address: an IPv4 address as is, an IPv6 address as its /64 network."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class ConnectionBudget:
    """The ledger of one transport's connections and its admission and eviction rules (see the module doc)."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self._pending: dict[Connection, str] = {}  # inbound handshakes, oldest first -> source
        self._pending_per_source: Counter[str] = Counter()
        self._established: dict[Connection, str] = {}  # -> source of an inbound one, "" for an outbound one
        self._inbound_per_source: Counter[str] = Counter()
        self._per_peer: Counter[PeerID] = Counter()
        self._dialing = 0
        self._protected: dict[PeerID, set[str]] = {}

    # -- protection --

    def protect(self, peer_id: PeerID, tag: str) -> None:
        self._protected.setdefault(peer_id, set()).add(tag)

    def unprotect(self, peer_id: PeerID, tag: str) -> bool:
        """Drop ``tag``'s protection of ``peer_id``; True if another tag still protects it."""
        tags = self._protected.get(peer_id)
        if tags is None:
            return False
        tags.discard(tag)
        if not tags:
            del self._protected[peer_id]
        return bool(tags)

    def set_protected(self, tag: str, peers: Iterable[PeerID]) -> None:
        """Make ``peers`` exactly the set that ``tag`` protects."""
        wanted = set(peers)
        for peer_id in [p for p, tags in self._protected.items() if tag in tags and p not in wanted]:
            self.unprotect(peer_id, tag)
        for peer_id in wanted:
            self.protect(peer_id, tag)

    def is_protected(self, peer_id: PeerID | None) -> bool:
        return peer_id is not None and peer_id in self._protected

    def protected_peers(self, tag: str | None = None) -> set[PeerID]:
        return {p for p, tags in self._protected.items() if tag is None or tag in tags}

    # -- counts --

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def established_count(self) -> int:
        return len(self._established)

    def _used(self) -> int:
        return len(self._established) + self._dialing

    def _unprotected_established(self) -> int:
        small, large = (
            (self._protected, self._per_peer)
            if len(self._protected) < len(self._per_peer)
            else (self._per_peer, self._protected)
        )
        protected = sum(self._per_peer[p] for p in small if p in large)
        return len(self._established) - protected

    def _victim(self, source: str | None = None) -> Connection | None:
        """The least useful established inbound connection (of ``source``), or None if none may go."""
        best: Connection | None = None
        for conn, src in self._established.items():
            if (
                src
                and (source is None or src == source)
                and conn.is_open
                and not conn.streams
                and not conn.tasks
                and conn.peer_id not in self._protected
                and (best is None or conn.last_active_s < best.last_active_s)
            ):
                best = conn
        return best

    # -- inbound --

    def check_pending(self, conn: Connection) -> Verdict:
        """May a just-accepted connection start its handshake?"""
        cfg, source = self.config, source_of(conn.remote_host)
        if self._pending_per_source[source] >= cfg.max_pending_per_ip:
            return Verdict(
                admit=False,
                limit="max_pending_per_ip",
                reason=f"{self._pending_per_source[source]} handshakes from {source} in progress "
                f"(max_pending_per_ip={cfg.max_pending_per_ip})",
            )
        if self._used() >= cfg.max_connections and self._victim() is None:
            return Verdict(
                admit=False,
                limit="max_connections",
                reason=f"max_connections={cfg.max_connections} connections established, each busy or protected",
            )
        if len(self._pending) >= cfg.max_pending_connections:
            busiest, _ = self._pending_per_source.most_common(1)[0]
            victim = next(c for c, src in self._pending.items() if src == busiest)
            return Verdict(
                admit=True,
                victim=victim,
                limit="max_pending_connections",
                reason=f"unauthenticated, the oldest handshake of {busiest}",
            )
        return ADMIT

    def add_pending(self, conn: Connection) -> None:
        source = source_of(conn.remote_host)
        self._pending[conn] = source
        self._pending_per_source[source] += 1

    def check_established(self, conn: Connection) -> Verdict:
        """May an inbound connection that finished its handshake stay? (Its PeerID is known now.)"""
        self._leave_pending(conn)
        cfg, source = self.config, source_of(conn.remote_host)
        protected = self.is_protected(conn.peer_id)
        if not protected and self._inbound_per_source[source] >= cfg.max_connections_per_ip:
            victim = self._victim(source)
            if victim is None:
                return Verdict(
                    admit=False,
                    limit="max_connections_per_ip",
                    reason=f"{self._inbound_per_source[source]} connections from {source}, each busy "
                    f"(max_connections_per_ip={cfg.max_connections_per_ip})",
                )
            return Verdict(
                admit=True, victim=victim, limit="max_connections_per_ip", reason=f"the least recently used of {source}"
            )
        full = self._used() >= cfg.max_connections
        if not full and (protected or self._unprotected_established() < cfg.max_connections - cfg.reserved_connections):
            return ADMIT
        victim = self._victim()
        if victim is None:
            which = "" if full else f", {cfg.reserved_connections} of them reserved for protected peers"
            return Verdict(
                admit=False,
                limit="max_connections",
                reason=f"max_connections={cfg.max_connections}{which}; each connection is busy or protected",
            )
        return Verdict(admit=True, victim=victim, limit="max_connections", reason="idle, the least recently used")

    def add_established(self, conn: Connection) -> None:
        if conn.peer_id is None:
            raise ValueError("internal: an established connection without a PeerID")
        source = "" if conn.initiator else source_of(conn.remote_host)
        self._established[conn] = source
        if source:
            self._inbound_per_source[source] += 1
        self._per_peer[conn.peer_id] += 1

    # -- outbound --

    def check_dial(self) -> Verdict:
        """May we dial one more peer? Our own dials evict idle inbound connections, never refuse them."""
        if self._used() < self.config.max_connections:
            return ADMIT
        victim = self._victim()
        if victim is None:
            return Verdict(
                admit=False,
                limit="max_connections",
                reason=f"max_connections={self.config.max_connections} reached; close idle peers or raise it",
            )
        return Verdict(
            admit=True, victim=victim, limit="max_connections", reason="idle, the least recently used (our own dial)"
        )

    def add_dial(self) -> None:
        self._dialing += 1

    def end_dial(self) -> None:
        self._dialing -= 1

    # -- closing --

    def _leave_pending(self, conn: Connection) -> None:
        source = self._pending.pop(conn, None)
        if source is not None:
            self._pending_per_source[source] -= 1
            if not self._pending_per_source[source]:
                del self._pending_per_source[source]

    def release(self, conn: Connection) -> None:
        """Forget a closed connection (idempotent)."""
        self._leave_pending(conn)
        source = self._established.pop(conn, None)
        if source is None:
            return
        if source:
            self._inbound_per_source[source] -= 1
            if not self._inbound_per_source[source]:
                del self._inbound_per_source[source]
        if conn.peer_id is not None:
            self._per_peer[conn.peer_id] -= 1
            if not self._per_peer[conn.peer_id]:
                del self._per_peer[conn.peer_id]
