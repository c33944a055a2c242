"""The validator role (``swarm-node start --role validator``): keeps every stage's weights in sync like a joining
peer, samples published receipts, replays them and publishes signed verdicts; it is an orchestrator candidate.

It replays with `swarm.training.replayer.StageReplayer`, which recomputes forward and backward with the functions
`StageServer` serves with (`swarm.training.compute`). Its loops run on `swarm.training.runloop.RunLoop`, like the
trainer's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from swarm.p2p.identity import Identity, PeerID
from swarm.dht import DHT
from swarm.dht.keys import config_key, owner_subkey, peers_key
from swarm.p2p import Transport
from swarm.run.config import RunConfig
from swarm.configs import Config, setting
from swarm.errors import ConfigError, SwarmError
from swarm.training.messages import PeerRecord, RunConfigRecord
from swarm.training.replayer import StageReplayer, TransportFetcher
from swarm.training.stage_rpc import call_state_download
from swarm.training.node_role import Role
from swarm.training.runloop import RunLoop, read_view, run_key_prefixes, unprotect_run_peers
from swarm.training.summary import NodeSummary, TrafficSummary
from swarm.training.view import SwarmView
from swarm.training.verifying import orchestrator_config
from swarm.verification.election import ElectionRole
from swarm.verification.orchestrator import Orchestrator
from swarm.verification.receipts import fetch_receipts
from swarm.verification.replay import ReceiptChecker
from swarm.verification.verdicts import VerdictBatch, publish_verdicts

log = logging.getLogger(__name__)

RECORD_PERIOD_S = 5.0  # how often the validator re-publishes its {run}/peers record
FINISH_GRACE_S = 30.0  # after the swarm reaches max_steps, how long to wait for the last attestations


class ValidatorConfig(Config, section="validator"):
    """The validator role of one node. Durations in seconds."""

    run: RunConfig = setting(doc="The run this node checks.")
    ledger_path: Path | None = setting(default=None, doc="File of the reward ledger.")
    summary_path: Path | None = setting(default=None, doc="Write the validator's summary JSON here when it stops.")
    max_steps: int | None = setting(default=None, ge=1, doc="Stop once the swarm reaches this step (None: never).")
    poll_interval_s: float = setting(default=0.2, gt=0, le=86400 * 365, doc="Seconds between polls for work.")
    rpc_timeout_s: float = setting(default=10.0, gt=0, le=86400 * 365, doc="Deadline of one request.")
    dht_timeout_s: float = setting(default=5.0, gt=0, le=86400 * 365, doc="Deadline of one DHT call.")
    check_delay_s: float = setting(
        default=1.0, gt=0, le=86400 * 365, doc="Seconds callers get to publish a window's receipts."
    )
    verdicts_ttl_s: float = setting(default=24 * 3600.0, gt=0, le=86400 * 365, doc="Lifetime of published verdicts.")

    def validate(self) -> None:
        if not self.run.verification.enabled:
            raise ConfigError("verification.enabled is false in the run config; a validator has nothing to do")


class ValidatorRole(RunLoop):
    """Syncs weights, checks closed windows, publishes verdicts, stands as orchestrator candidate."""

    def __init__(self, cfg: ValidatorConfig, *, transport: Transport, dht: DHT, identity: Identity) -> None:
        super().__init__(poll_interval_s=cfg.poll_interval_s, summary_path=cfg.summary_path)
        self.cfg = cfg
        self.settings = cfg.run.verification
        self.run_id = cfg.run.run_id
        self.transport = transport
        self.dht = dht
        self.me = identity.peer_id
        self.view = SwarmView()
        self.replayer = StageReplayer(cfg.run, self.settings.retention_steps)
        self.checker = ReceiptChecker(
            identity,
            self.settings.check(),
            self.replayer,
            TransportFetcher(transport, cfg.rpc_timeout_s),
            present=self.is_serving,
        )
        self.orchestrator = Orchestrator(
            identity,
            orchestrator_config(
                self.settings,
                run_id=self.run_id,
                role=ElectionRole.VALIDATOR,
                ledger_path=cfg.ledger_path,
                tick_s=0.5,
                dht_timeout_s=cfg.dht_timeout_s,
            ),
            dht,
            current_step=self.current_step,
            window_ready=lambda w: self.next_window is not None and w < self.next_window,
        )
        self._record_published = float("-inf")
        self._sync_failed: set[tuple[PeerID, int]] = set()
        self.next_window: int | None = None
        self._step_seen = 0
        self._newest_seen = 0
        self._done_since: float | None = None  # since when the swarm is at max_steps (or its trainers are gone)
        self.stats = {"checks": 0, "failed": 0, "windows_checked": 0, "states_synced": 0}
        self.started = time.monotonic()
        self._traffic_start = transport.traffic.snapshot()  # the summary counts the bytes from here

    def current_step(self) -> int:
        """The swarm's step: the slowest stage's newest step, never going back (records expire when nodes stop)."""
        steps = [self.view.newest_step(s)[1] for s in range(self.cfg.run.pipeline.num_stages)]
        self._step_seen = max(self._step_seen, min(steps) if steps else 0)
        return self._step_seen

    def newest_step(self) -> int:
        """The newest step any server reports (servers evict retained work relative to their own step)."""
        steps = [r.step for r in self.view.peers.values() if r.stage is not None]
        self._newest_seen = max([self._newest_seen, *steps])
        return self._newest_seen

    async def is_serving(self, peer: PeerID) -> bool:
        """Whether ``peer`` is still up, so that not answering ``verify.fetch`` is its fault: listed and it answers a
        DHT ping (a server that reached ``max_steps`` keeps serving until the last window is attested)."""
        if peer not in self.view.peers:
            return False
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                await self.dht.protocol.call_ping(peer)
        except (SwarmError, TimeoutError, OSError):
            return False
        return True

    def last_attestable_window(self) -> int | None:
        """With ``max_steps``, the last window that closes ``settle_steps`` before the swarm stops (else None)."""
        if self.cfg.max_steps is None:
            return None
        return self.settings.last_attestable_window(self.cfg.max_steps)

    def finished(self) -> bool:
        """With ``max_steps``: every attestable window was checked and has an accepted attestation."""
        max_steps, last = self.cfg.max_steps, self.last_attestable_window()
        if max_steps is None or last is None or self.current_step() < max_steps:
            return False
        return (self.next_window or 0) > last and self.orchestrator.next_window > last

    async def run(self, stop_event: asyncio.Event) -> None:
        """Validate until ``stop_event`` is set or the swarm reaches ``max_steps``."""
        log.info(
            "%s: validating run %s (p=%.2f, window %d steps)",
            self.me.short(),
            self.run_id,
            self.settings.sample_probability,
            self.settings.window_steps,
        )
        self.dht.prefer_prefixes(run_key_prefixes(self.run_id, self.cfg.run.name))  # evicted last when storage is full
        try:
            await self.run_loops(stop_event, [self._check_loop(), self._orchestrator_loop()])
        finally:
            unprotect_run_peers(self.transport)

    async def _is_over(self, stop_event: asyncio.Event) -> bool:
        """Every attestable window attested, or the swarm stopped ``FINISH_GRACE_S`` ago."""
        if self.finished():
            return True
        trainers_gone = self._step_seen > 0 and not any(r.stage is not None for r in self.view.peers.values())
        if self.cfg.max_steps is not None and (self.current_step() >= self.cfg.max_steps or trainers_gone):
            self._done_since = self._done_since or time.monotonic()
            if time.monotonic() - self._done_since > FINISH_GRACE_S:
                log.warning(
                    "%s: the swarm stopped at step %d; not every window was attested",
                    self.me.short(),
                    self.current_step(),
                )
                return True
        return False

    async def refresh_view(self) -> bool:
        view = await read_view(self.dht, self.transport, run_id=self.run_id, timeout_s=self.cfg.dht_timeout_s)
        if view is not None:
            self.view = view
        return view is not None

    async def _after_view(self, fresh: bool) -> None:
        """Announce this validator (with a fresh view), then download the stages' new states."""
        if fresh:
            try:
                await self._publish_record()
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning("%s: could not refresh the swarm view: %s", self.me.short(), e)
        await self._sync_states()

    async def _publish_record(self) -> None:
        """Announce this validator in ``{run}/peers`` (stage None; drivers may wait for it before starting), and its
        config in ``runs/{name}/config``."""
        if time.monotonic() - self._record_published < RECORD_PERIOD_S:
            return
        record = PeerRecord(
            role=Role.VALIDATOR,
            stage=None,
            maddrs=list(self.transport.advertised_maddrs),
            reachability=self.transport.reachability,
            throughput=0.0,
            step=self.current_step(),
            config_hash=self.cfg.run.config_hash(),
        )
        run = self.cfg.run
        config = RunConfigRecord(hash=run.config_hash(), config=run.identity_dict())  # the join check counts it
        expiration, subkey = time.time() + 2 * RECORD_PERIOD_S, owner_subkey(self.me)
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            await asyncio.gather(
                self.dht.store(peers_key(self.run_id), record.to_wire(), expiration, subkey=subkey),
                self.dht.store(config_key(run.name), config.to_wire(), expiration, subkey=subkey),
            )
        self._record_published = time.monotonic()

    async def _sync_states(self) -> None:
        """Download each stage's weights once per step (like a joining peer) so that step can be replayed."""
        for peer, record in sorted(self.view.peers.items()):
            stage, step = record.stage, record.step
            if stage is None or step < 0 or self.replayer.has(stage, step, peer) or (peer, step) in self._sync_failed:
                continue
            try:
                state = await call_state_download(
                    self.transport, peer, run_id=self.run_id, stage=stage, timeout_s=self.cfg.rpc_timeout_s
                )
            except (SwarmError, TimeoutError, OSError) as e:
                self._sync_failed.add((peer, step))  # not retried for this step
                self.replayer.refused.add((stage, step, peer))
                log.warning(
                    "%s: could not download stage %d weights of step %d from %s: %s",
                    self.me.short(),
                    stage,
                    step,
                    peer.short(),
                    e,
                )
                continue
            await asyncio.to_thread(self.replayer.add_state, state, peer)
            self.stats["states_synced"] += 1
            log.debug("%s: synced stage %d at step %d from %s", self.me.short(), stage, state.step, peer.short())
        oldest = self.newest_step() - self.settings.retention_steps
        self._sync_failed = {(p, t) for p, t in self._sync_failed if t >= oldest}

    async def _check_loop(self) -> None:
        window_steps = self.settings.window_steps
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            step = self.current_step()
            if self.next_window is None:
                self.next_window = step // window_steps
            if step < (self.next_window + 1) * window_steps:
                continue
            last = self.last_attestable_window()
            if last is not None and self.next_window > last:
                continue  # its servers stop before it could be attested: checking them would flag departures
            await asyncio.sleep(self.cfg.check_delay_s)  # let callers publish the window's receipts
            try:
                await self.check_window(self.next_window)
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning("%s: checking window %d failed: %s", self.me.short(), self.next_window, e)
            self.next_window += 1

    async def check_window(self, window: int) -> list[Any]:
        """Sample the window's receipts, replay them, publish the verdicts."""
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            batches = await fetch_receipts(self.dht, self.run_id, window)
        receipts = [r for b in batches.values() for r in b.receipts]
        # receipts older than the servers' retention window are not demanded (this validator fell behind)
        min_step = self.newest_step() - self.settings.retention_steps + 3
        verdicts = await self.checker.check_window(receipts, window, min_step=min_step)
        self.stats["checks"] += len(verdicts)
        self.stats["failed"] += sum(1 for v in verdicts if not v.passed)
        self.stats["windows_checked"] += 1
        if verdicts:
            batch = VerdictBatch(run_id=self.run_id, window=window, publisher=self.me.to_bytes(), verdicts=verdicts)
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                await publish_verdicts(self.dht, batch, time.time() + self.cfg.verdicts_ttl_s)
        log.info(
            "%s: window %d: %d receipts, %d checked, %d failed",
            self.me.short(),
            window,
            len(receipts),
            len(verdicts),
            sum(1 for v in verdicts if not v.passed),
        )
        return verdicts

    async def _orchestrator_loop(self) -> None:
        while True:
            try:
                await self.orchestrator.tick()
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning("%s: orchestrator round failed: %s", self.me.short(), e)
            await asyncio.sleep(self.orchestrator.cfg.tick_s)

    def summary(self) -> NodeSummary:
        """The validator's counts and attested windows (the launcher aggregates them)."""
        return NodeSummary(
            peer_id=self.me.to_base58(),
            role=Role.VALIDATOR,
            step=self.current_step(),
            run_id=self.run_id,
            checks=self.stats["checks"],
            failed=self.stats["failed"],
            windows_checked=self.stats["windows_checked"],
            states_synced=self.stats["states_synced"],
            attested_windows=[a.window for a in self.orchestrator.signed],
            ledger_path=str(self.cfg.ledger_path) if self.cfg.ledger_path else None,
            elapsed_s=time.monotonic() - self.started,
            traffic=TrafficSummary.of(
                self.transport.traffic.snapshot().minus(self._traffic_start), self.current_step()
            ),
        )
