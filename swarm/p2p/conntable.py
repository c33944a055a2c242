"""The connections of one transport: every one it owns, the established ones by peer, and who hears of peers.

``all`` holds each connection from its socket's start until it is closed and its last handler task is done
(the reaper or the transport's ``stop()`` forgets it then); ``by_peer`` holds the established ones (handshake
done, admitted), reused for every call to that peer. The callbacks hear when a peer gets its first open
connection and when its last one closes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from swarm.p2p.connection import Connection
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress

log = logging.getLogger(__name__)

PeerCallback = Callable[[PeerID, PeerAddress], None]


class ConnectionTable:
    """The connections of one transport (see the module docstring)."""

    def __init__(self, local: PeerID) -> None:
        self.local = local
        self.all: set[Connection] = set()
        self.by_peer: dict[PeerID, list[Connection]] = {}
        self.on_connected: list[PeerCallback] = []
        self.on_disconnected: list[PeerCallback] = []

    def open_connection(self, peer_id: PeerID) -> Connection | None:
        """An open connection to ``peer_id`` to reuse, if there is one (a direct one before a relayed one).

        Two peers that dial each other at once keep both connections; both then pick the one dialled by the
        smaller peer id, so their traffic shares one TCP flow instead of two competing for the same links.
        """
        dialled_by_us = self.local < peer_id
        best: tuple[bool, bool] | None = None
        chosen = None
        for conn in self.by_peer.get(peer_id, ()):
            if conn.is_open:
                rank = (conn.relayed, conn.initiator != dialled_by_us)
                if best is None or rank < best:
                    best, chosen = rank, conn
        return chosen

    def connected_peers(self) -> list[PeerID]:
        return [peer for peer, conns in self.by_peer.items() if any(c.is_open for c in conns)]

    def establish(self, conn: Connection, *, running: bool) -> None:
        """A connection finished its handshake and was admitted: serve its peer's calls over it."""
        peer_id = conn.peer_id
        if peer_id is None or not conn.is_open:
            return
        if peer_id == self.local:  # the accepting side of a dial to ourselves
            conn.close("a connection from ourselves", warn=False)
            return
        if not running:
            conn.close("the transport is stopping", warn=False)
            return
        conns = self.by_peer.setdefault(peer_id, [])
        first = not any(c.is_open for c in conns)
        conns.append(conn)
        log.debug(
            "%s: %s connection with %s (%s:%d)",
            self.local.short(),
            "outbound" if conn.initiator else "inbound",
            peer_id.short(),
            conn.remote_host,
            conn.remote_port,
        )
        if first:
            self._notify(self.on_connected, conn)

    def forget(self, conn: Connection) -> None:
        """A connection closed: forget it (``all`` keeps it while handler tasks of it still run)."""
        if not conn.tasks:
            self.all.discard(conn)
        if conn.peer_id is None or conn not in self.by_peer.get(conn.peer_id, ()):
            return
        conns = self.by_peer[conn.peer_id]
        conns.remove(conn)
        if not conns:
            del self.by_peer[conn.peer_id]
            self._notify(self.on_disconnected, conn)

    def inflight(self, conn: Connection) -> int:
        """Requests being served for ``conn``'s peer, over all its connections."""
        conns = self.by_peer.get(conn.peer_id, ()) if conn.peer_id is not None else ()
        return sum(len(c.tasks) for c in conns) if conn in conns else len(conn.tasks)

    def reap(self, now: float, idle_timeout_s: float) -> None:
        """One pass of the reaper: forget finished connections, close idle ones, trim the others' read buffers."""
        for conn in list(self.all):
            if conn.closed and not conn.tasks:
                self.all.discard(conn)
            elif conn.is_open and not conn.streams and now - conn.last_active_s > idle_timeout_s:
                conn.close(f"idle for over idle_timeout_s={idle_timeout_s}s", warn=False)
            elif conn.is_open:
                conn.trim_read_buffer()

    def clear(self) -> None:
        self.all.clear()
        self.by_peer.clear()

    def _notify(self, callbacks: list[PeerCallback], conn: Connection) -> None:
        peer_id = conn.peer_id
        if peer_id is None:
            return
        addr = PeerAddress(
            host=conn.remote_host or "0.0.0.0",
            port=conn.remote_port,
            peer_id=peer_id,
            protocol="ip6" if ":" in conn.remote_host else "ip4",
        )
        for callback in callbacks:
            try:
                callback(peer_id, addr)
            except Exception:
                log.exception("%s: peer callback %r failed for %s", self.local.short(), callback, peer_id.short())
