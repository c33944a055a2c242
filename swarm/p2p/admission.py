"""Admission: carries out the connection budgets' verdicts for a transport (docs/transport.md, "Connection budgets").

It evicts the victims the budget names, tells refused and evicted peers the truth (a refusal record before the
handshake, an ERROR frame on stream 0 after it; the connection lingers half-closed up to
``LINGER_S`` so the peer can read why, at most ``max_pending_connections`` at a time), and logs all of it through
the rate-limited ConnectionLog. The transport asks it at three points: a connection is accepted
(``accept``), an inbound handshake finished (``establish``), we dial (``dial_slot``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from swarm.errors import OverloadedError
from swarm.p2p.budget import ConnectionBudget, Verdict, source_of
from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.connlog import ConnectionLog

LINGER_S = 1.0  # at most this long (and at most handshake_timeout_s) a refused connection waits for its peer


class Admission:
    """The budget of one transport plus what enforcing it takes: evictions, honest refusals, summarized logs."""

    def __init__(self, config: TransportConfig, logger: logging.Logger, local_short: str) -> None:
        self.config = config
        self.budget = ConnectionBudget(config)
        self.log = ConnectionLog(logger, local_short, interval_s=config.connection_log_interval_s)
        self._local = local_short
        self._refusing: set[Connection] = set()  # refused connections lingering until the peer reads why

    def accept(self, conn: Connection) -> bool:
        """An inbound connection was accepted: may it start its handshake? (Evicts or refuses as the budget says.)"""
        if not self._carry_out(conn, self.budget.check_pending(conn)):
            return False
        self.budget.add_pending(conn)
        return True

    def establish(self, conn: Connection) -> bool:
        """An inbound connection finished its handshake (its PeerID is known): may it stay?"""
        if conn.closed or not self._carry_out(conn, self.budget.check_established(conn)):
            return False
        self.budget.add_established(conn)
        return True

    @contextlib.contextmanager
    def dial_slot(self) -> Iterator[None]:
        """Hold a slot for one outbound dial (OverloadedError if none can be made); call ``dialled`` inside."""
        verdict = self.budget.check_dial()
        if not self._carry_out(None, verdict):
            raise OverloadedError(verdict.reason)
        self.budget.add_dial()
        try:
            yield
        finally:
            self.budget.end_dial()

    def dialled(self, conn: Connection) -> None:
        """Our dial finished its handshake: the connection takes the slot ``dial_slot`` held."""
        self.budget.add_established(conn)

    def _carry_out(self, conn: Connection | None, verdict: Verdict) -> bool:
        """Evict the verdict's victim; refuse ``conn`` if it is not admitted. True if it is."""
        victim = verdict.victim
        if victim is not None:
            self.log.warning(
                f"evicted ({verdict.limit})",
                source_of(victim.remote_host),
                "%s: evicting the connection of %s to make room (%s): %s",
                self._local,
                victim.peer_short,
                verdict.limit,
                verdict.reason,
            )
            self.budget.release(victim)  # its slot is free now, even while its refusal lingers
            self.turn_away(victim, f"evicted to make room ({verdict.limit}): {verdict.reason}")
        if verdict.admit or conn is None:
            return verdict.admit
        self.log.warning(
            f"refused ({verdict.limit})",
            source_of(conn.remote_host),
            "%s: refusing a connection from %s: at the connection limit: %s",
            self._local,
            conn.peer_short,
            verdict.reason,
        )
        self.turn_away(conn, verdict.reason)
        return False

    def turn_away(self, conn: Connection, reason: str) -> None:
        """Tell ``conn``'s peer that we are at our connection limit and close; at once (the peer may not learn
        why) if too many refusals linger already."""
        linger_s = min(LINGER_S, self.config.handshake_timeout_s)
        if len(self._refusing) < self.config.max_pending_connections and conn.refuse(reason, linger_s):
            self._refusing.add(conn)
        else:
            conn.close(f"refused: {reason}", warn=False)

    def warn_close(self, conn: Connection, reason: str) -> None:
        """A connection closes for a reason worth a warning (bad input, a failed handshake): rate limited."""
        kind = "closed during the handshake" if conn.peer_id is None else "closed for bad input"
        self.log.warning(
            kind,
            source_of(conn.remote_host),
            "%s: closing connection to %s: %s",
            conn.local_short,
            conn.peer_short,
            reason,
        )

    def closed(self, conn: Connection) -> None:
        """Forget a closed connection (idempotent)."""
        self.budget.release(conn)
        self._refusing.discard(conn)

    def close_all(self) -> None:
        """The transport stops: close the lingering refusals and log the last summary."""
        for conn in list(self._refusing):
            conn.close("the transport is stopping", warn=False)
        self._refusing.clear()
        self.log.flush()
