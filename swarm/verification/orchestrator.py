"""The orchestrator candidate: heartbeats, leader election per window, attestation of every closed window.

Each candidate walks the windows in order with a cursor. For the first window it has not seen attested: if
the window is closed (the swarm's step is ``settle_steps`` past its end) and an attestation is stored, it
accepts the one `pick_attestation` chooses and moves on; if none is stored and this node is the leader
(`choose_leader` over live heartbeats), it computes the rewards, signs, stores and appends to its ledger.
A candidate that takes over therefore attests every window the old leader missed, in order, none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from swarm.p2p.identity import Identity, PeerID
from swarm.configs import Config, setting
from swarm.errors import SwarmError
from swarm.verification.attestation import (
    GENESIS_DIGEST,
    Attestation,
    build_attestation,
    fetch_attestations,
    pick_attestation,
    publish_attestation,
)
from swarm.verification.common import RecordStore
from swarm.verification.election import (
    ElectionRole,
    ElectionConfig,
    choose_leader,
    fetch_heartbeats,
    publish_heartbeat,
    sign_heartbeat,
)
from swarm.verification.ledger import Ledger
from swarm.verification.outliers import fetch_reports
from swarm.verification.receipts import fetch_receipts
from swarm.verification.rewards import RewardConfig, compute_rewards
from swarm.verification.verdicts import fetch_verdicts

log = logging.getLogger(__name__)


class OrchestratorConfig(Config, section="orchestrator"):
    """One candidate's settings; ``rewards`` and ``election`` come from the run config."""

    run_id: str = setting(doc="The run whose rewards are attested.")
    role: ElectionRole = setting(
        default=ElectionRole.CANDIDATE,
        convert=ElectionRole.parse,
        choices=tuple(role.value for role in ElectionRole),
        doc="validator or candidate (a string is parsed).",
    )
    election: ElectionConfig = setting(default_factory=ElectionConfig, doc="Heartbeats of the election.")
    rewards: RewardConfig = setting(default_factory=RewardConfig, doc="How work is weighed.")
    settle_steps: int = setting(default=2, ge=0, le=1_000_000, doc="Steps after a window closes before attesting it.")
    settle_s: float = setting(
        default=3.0, ge=0, le=3600, doc="Least seconds between a window closing and its attestation."
    )
    tick_s: float = setting(default=0.5, gt=0, le=365 * 86400, doc="Seconds between rounds of the orchestrator loop.")
    record_ttl_s: float = setting(default=24 * 3600.0, gt=0, le=365 * 86400, doc="Lifetime of attestations.")
    dht_timeout_s: float = setting(default=10.0, gt=0, le=365 * 86400, doc="Deadline of one DHT call.")
    ledger_path: str | None = setting(default=None, doc="File of the reward ledger (None: in memory only).")

    def validate(self) -> None:
        if not self.run_id:
            raise self.invalid("run_id", "must not be empty")


class Orchestrator:
    """A candidate: publishes heartbeats and, while it leads, attests closed windows."""

    def __init__(
        self,
        identity: Identity,
        cfg: OrchestratorConfig,
        store: RecordStore,
        current_step: Callable[[], int],
        clock: Callable[[], float] = time.time,
        window_ready: Callable[[int], bool] | None = None,
    ) -> None:
        """``window_ready(w)``: an extra condition before attesting window ``w`` (a validator's own check done)."""
        self.identity = identity
        self.window_ready = window_ready
        self._closed_at: dict[int, float] = {}
        self.cfg = cfg
        self.store = store
        self.current_step = current_step
        self.clock = clock
        self.ledger = Ledger(cfg.ledger_path) if cfg.ledger_path else None
        self.accepted: dict[int, Attestation] = {}
        self.signed: list[Attestation] = []
        self._next_window = 0
        self._last_heartbeat = float("-inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def next_window(self) -> int:
        return self._next_window

    async def start(self) -> None:
        """Start the background loop (cancelled and awaited by `stop`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"orchestrator-{self.identity.peer_id.short()}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except (SwarmError, TimeoutError) as e:
                log.warning("orchestrator %s: round failed, retrying: %s", self.identity.peer_id.short(), e)
            await asyncio.sleep(self.cfg.tick_s)

    async def tick(self) -> list[Attestation]:
        """One round: heartbeat if due, then accept or sign every closed window in order."""
        now = self.clock()
        if now - self._last_heartbeat >= self.cfg.election.heartbeat_interval_s:
            hb = sign_heartbeat(
                self.identity, run_id=self.cfg.run_id, role=self.cfg.role, now=now, cfg=self.cfg.election
            )
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                await publish_heartbeat(self.store, hb)
            self._last_heartbeat = now
        signed_before = len(self.signed)
        window_steps = self.cfg.rewards.window_steps
        last_closed = (self.current_step() - self.cfg.settle_steps) // window_steps - 1
        for window in range(self._next_window, last_closed + 1):
            self._closed_at.setdefault(window, now)  # when this node first saw the window closed
        while self._next_window <= last_closed:
            if self.clock() - self._closed_at[self._next_window] < self.cfg.settle_s:
                break  # let callers and validators publish the window's receipts and verdicts
            if await self._advance(self._next_window) is None:
                break
            self._closed_at.pop(self._next_window - 1, None)
        return self.signed[signed_before:]

    async def _advance(self, window: int) -> Attestation | None:
        run_id = self.cfg.run_id
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            existing = pick_attestation(await fetch_attestations(self.store, run_id, window), run_id, window)
        if existing is None:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                heartbeats = await fetch_heartbeats(self.store, run_id)
            if choose_leader(heartbeats, run_id, self.clock()) != self.identity.peer_id:
                return None
            if self.window_ready is not None and not self.window_ready(window):
                return None
            existing = await self._attest(window)
        self.accepted[window] = existing
        self._next_window = window + 1
        return existing

    async def _attest(self, window: int) -> Attestation:
        run_id, cfg = self.cfg.run_id, self.cfg.rewards
        prev = self.accepted.get(window - 1)
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            receipts = await fetch_receipts(self.store, run_id, window)
            verdicts = await fetch_verdicts(self.store, run_id, window)
            reports = await fetch_reports(self.store, run_id, window) if cfg.outlier_min_reporters > 0 else {}
        prev_flagged = [PeerID(p) for p in prev.flagged] if prev else []
        outcome = compute_rewards(run_id, window, receipts, verdicts, prev_flagged, cfg, reports)
        term = 1 if prev is None else prev.term + (0 if prev.orchestrator == self.identity.peer_id.to_bytes() else 1)
        att = build_attestation(
            self.identity,
            run_id=run_id,
            window=window,
            term=term,
            cfg=cfg,
            outcome=outcome,
            receipts=receipts,
            verdicts=verdicts,
            reports=reports,
            prev_digest=prev.digest if prev else GENESIS_DIGEST,
            issued_at=self.clock(),
        )
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            await publish_attestation(self.store, att, self.clock() + self.cfg.record_ttl_s)
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.append, att)
        self.signed.append(att)
        log.info(
            "orchestrator %s: attested %s window %d (term %d): %d peers paid, %d flagged",
            self.identity.peer_id.short(),
            run_id,
            window,
            term,
            sum(1 for s in outcome.shares.values() if s > 0),
            len(outcome.flagged),
        )
        return att
