"""Averaging matchmaking ahead of the step's close (`AheadAnnouncer`).

When the served step opens (every-step averaging), the stage server tells the stage's other peers the entry it will
average with at the step's close (`swarm.averaging.Averager.announce_ahead`), and renews it while the step stays
open. At the close, a stage whose peers all announced ahead forms its group with no announcement on the step's
critical path: the all-reduce starts as soon as each member has closed the step, half a round trip earlier than an
announcement sent at the close.

The entry states the digest of the weights the step computes with, taken when the step opens: a server's weights
change only together with its step number, so it is the digest at the close too, and the stage states that one
(`digest_of`): a member whose entry changed after its peers ranked it would break the round.
"""

from __future__ import annotations

import logging
import time

from swarm.averaging import Averager
from swarm.dht.keys import averaging_group_key
from swarm.p2p.identity import PeerID
from swarm.training.replicas import Replicas
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState

log = logging.getLogger(__name__)


class AheadAnnouncer:
    """Announces the served step's averaging entry when the step opens, renewed every ``matchmaking_time_s / 2``."""

    def __init__(self, state: TrainerState, *, averager: Averager, replicas: Replicas) -> None:
        self.state = state
        self.averager = averager
        self.replicas = replicas
        self._key = ""  # the group key last announced ahead
        self._sent = 0.0  # when (monotonic)
        self._digest = b""  # the digest it stated

    def digest_of(self, server: StageServer) -> bytes | None:
        """The weights' digest announced ahead for ``server``'s current step (None: none was)."""
        key = averaging_group_key(self.state.run_id, server.index, server.step)
        return self._digest if key == self._key else None

    def expected(self, server: StageServer, confirmed: frozenset[PeerID]) -> list[PeerID]:
        """The stage's other peers this node averages with (confirmed offenders left out)."""
        st = self.state
        return [p for p in st.view.stage_peers(server.index) if p != st.me and p not in confirmed]

    async def announce(self, server: StageServer, confirmed: frozenset[PeerID]) -> None:
        """Announce (or renew) the entry of ``server``'s open step, unless done within ``matchmaking_time_s / 2``."""
        st = self.state
        if not server.accepting:
            return
        step, key = server.step, averaging_group_key(st.run_id, server.index, server.step)
        now = time.monotonic()
        if key == self._key and now - self._sent < st.cfg.matchmaking_time_s / 2:
            return
        others = self.expected(server, confirmed)
        if not others:
            return
        if key != self._key:
            digest = await self.replicas.digest(server)
            if server.step != step or not server.accepting:  # the step moved on while hashing
                return
            self._digest = digest
        self._key, self._sent = key, now
        self.averager.announce_ahead(
            key, expected=others, state_digest=self._digest, state_age_steps=st.state_age_steps
        )
