"""`SwarmWatcher`: the swarm as the DHT shows it, read every ``refresh_s`` for the HTTP endpoints.

Each round reads the run's peer and progress records (a `SwarmView`; whether that read succeeded is the health
check's "can reach the DHT"), the attestations and verdicts of the last ``attestation_windows`` closed reward
windows (an attested window is read once), and every ``reach_interval_s`` pings the peers in the records
(reachability). It also follows this node's own step and losses. Everything is cached, so a scrape or a page load
never waits on the network; the owner (`swarm.observe.http.Observer`) runs `run` as a task and cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarm.dht.keys import peers_key, progress_key
from swarm.errors import SwarmError
from swarm.observe.config import HttpConfig
from swarm.observe.history import Curves, StepClock
from swarm.observe.source import NodeSource, node_step, own_losses, run_config
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig
from swarm.training.view import SwarmView
from swarm.verification.attestation import Attestation, fetch_attestations, pick_attestation
from swarm.verification.verdicts import fetch_verdicts

log = logging.getLogger(__name__)

MAX_WINDOWS_KEPT = 256


@dataclass(frozen=True)
class Reach:
    """Whether a peer answered a ping (its round trip in milliseconds)."""

    reachable: bool
    rtt_ms: float | None = None


@dataclass
class WindowFacts:
    """One reward window: its accepted attestation (None: none yet) and the verdicts published for it, counted by
    (result, subject) with result ``pass``/``fail`` and subject ``self``/``other``."""

    window: int
    attestation: Attestation | None = None
    verdicts: Counter[tuple[str, str]] = field(default_factory=Counter)


class SwarmWatcher:
    """The cached view of the swarm the endpoints read (see the module docstring)."""

    def __init__(self, cfg: HttpConfig, source: NodeSource, *, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.view = SwarmView()
        self.view_at: float | None = None  # when the records were last read (monotonic)
        self.dht_error: str | None = "the node has not joined the DHT yet"
        self.reach: dict[PeerID, Reach] = {}
        self.windows: dict[int, WindowFacts] = {}
        self.steps = StepClock(clock())
        self.curves = Curves(max_points=cfg.max_curve_points)
        self._reach_at = float("-inf")
        self._dropped_verdicts: Counter[tuple[str, str]] = Counter()  # of windows no longer kept

    async def run(self) -> None:
        """Refresh forever, every ``refresh_s`` (cancelled by the owner)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.cfg.refresh_s)

    async def refresh(self) -> None:
        """One round: the node's own step and losses, then the records, the windows and the pings."""
        role = self.source.role()
        self.steps.observe(node_step(role), self.clock())
        own_train, own_eval = own_losses(role)
        self.curves.add(own_train, own_eval, own=True)
        dht, run = self.source.dht(), run_config(role)
        if dht is None:
            return
        if run is None:  # a DHT-only node (or a role still starting): the routing table says whether it is in
            self.dht_error = None if len(dht.table) > 0 else "no peer in the DHT routing table"
            return
        if not await self._read_view(dht, run):
            return
        if run.verification.enabled and self.steps.step is not None:
            await self._read_windows(dht, run, self.steps.step)
        if self.clock() - self._reach_at >= self.cfg.reach_interval_s:
            self._reach_at = self.clock()
            await self._ping_peers()

    def verdict_totals(self) -> Counter[tuple[str, str]]:
        """Verdicts seen in every window read so far, by (result, subject)."""
        total = Counter(self._dropped_verdicts)
        for facts in self.windows.values():
            total.update(facts.verdicts)
        return total

    def attested(self) -> list[WindowFacts]:
        """The windows with an accepted attestation, newest first."""
        return sorted((f for f in self.windows.values() if f.attestation is not None), key=lambda f: -f.window)

    async def _read_view(self, dht: Any, run: RunConfig) -> bool:
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                peers = await dht.get(peers_key(run.run_id), latest=True)
                progress = await dht.get(progress_key(run.run_id), latest=True)
        except (SwarmError, TimeoutError, OSError) as e:
            self.dht_error = f"reading the run's records failed: {e or type(e).__name__}"
            log.debug("%s: %s", self.source.me.short(), self.dht_error)
            return False
        self.view, self.view_at = SwarmView.parse(peers, progress), self.clock()
        self.dht_error = None if len(dht.table) > 0 else "no peer in the DHT routing table"
        train: dict[int, list[float]] = {}
        evals: dict[int, float] = {}
        for record in self.view.progress.values():
            if record.loss is not None:
                train.setdefault(record.step, []).append(record.loss)
            if record.eval_step is not None and record.eval_loss is not None:
                evals[record.eval_step] = record.eval_loss
        self.curves.add({s: sum(v) / len(v) for s, v in train.items()}, evals, own=False)
        return True

    async def _read_windows(self, dht: Any, run: RunConfig, step: int) -> None:
        """The attestation and the verdicts of each recent closed window not attested yet."""
        closed = step // run.verification.window_steps  # windows below this one are closed
        me = self.source.me
        for window in range(max(0, closed - self.cfg.attestation_windows), closed):
            facts = self.windows.setdefault(window, WindowFacts(window))
            if facts.attestation is not None:
                continue
            try:
                async with asyncio.timeout(self.cfg.dht_timeout_s):
                    found = await fetch_attestations(dht, run.run_id, window)
                    batches = await fetch_verdicts(dht, run.run_id, window)
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: reading window %d failed: %s", me.short(), window, e)
                return
            facts.attestation = pick_attestation(found, run.run_id, window)
            facts.verdicts = Counter(
                ("pass" if v.passed else "fail", "self" if v.subject_id == me else "other")
                for batch in batches.values()
                for v in batch.verdicts
                if v.is_valid()
            )
        while len(self.windows) > MAX_WINDOWS_KEPT:
            self._dropped_verdicts.update(self.windows.pop(min(self.windows)).verdicts)

    async def _ping_peers(self) -> None:
        """Ping the peers in the records (at most ``max_pinged_peers``), each within ``ping_timeout_s``."""
        me, transport = self.source.me, self.source.transport
        targets = [(p, r) for p, r in sorted(self.view.peers.items()) if p != me][: self.cfg.max_pinged_peers]

        async def ping(peer: PeerID, maddrs: list[str]) -> Reach:
            try:
                async with asyncio.timeout(self.cfg.ping_timeout_s):
                    rtt_s = await transport.ping(maddrs[0] if maddrs else peer, timeout_s=self.cfg.ping_timeout_s)
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: ping of %s failed: %s", me.short(), peer.short(), e)
                return Reach(False)
            return Reach(True, round(rtt_s * 1000, 2))

        results = await asyncio.gather(*(ping(p, list(r.maddrs)) for p, r in targets))
        self.reach = {me: Reach(True, 0.0)} | dict(zip((p for p, _ in targets), results, strict=True))
