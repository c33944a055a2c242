"""The node's training role: serve a stage, drive microbatches, publish records, close steps, keep in sync.

One `TrainingRole` per node, on the node's transport and DHT. `run(stop_event)` checks the run config against the
swarm's, picks a stage (``stage=None``: the weakest), loads its state (checkpoint, or a download from the peer of
the stage with the newest step), then runs its loops in one TaskGroup until ``stop_event`` is set or ``max_steps``
is reached:

- view: read ``{run}/peers`` and ``{run}/progress`` every ``view_interval_s``, and at once on a ``step.hint``;
- records: publish this node's `PeerRecord` every ``record_period_s`` (expiry twice that);
- steps: when the step's samples reach the target batch size, average gradients with the stage's peers
  (weighted by samples) and apply the optimizer; download state when fallen behind;
- drivers (stage-0 nodes and trainers): push microbatches of this node's shard (`swarm.driver`);
- rebalance: at randomized intervals, move to another stage when that clearly raises the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from dht.identity import PeerID
from dht.maddr import parse_maddr
from dht.records import owner_subkey
from dht.transport import RpcContext, Transport
from swarm.averaging import Averager, AveragerConfig
from swarm.balancing import StagePeer, choose_move, choose_stage
from swarm.checkpoint import CheckpointError, apply_state, capture_state, load_state, save_state
from swarm.data import ShardedData
from swarm.driver import Driver
from swarm.errors import AddressError, SwarmError
from swarm.messages import PeerRecord
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stage
from swarm.progress import ProgressRecord, StepHint, StepHintReply
from swarm.stage_rpc import RemoteStageClient, StageService, call_state_download
from swarm.stage_server import StageServer, StageServerConfig, StaleStepError
from swarm.tied import TiedService, tied_index
from swarm.training_config import TrainingConfig
from swarm.view import SwarmView, config_key, peers_key, progress_key
from swarm.verifying import NodeVerification
from swarm.wiring import NoPeerError, PeerSelector
from verification.attestation import fetch_attestations

log = logging.getLogger(__name__)


class _Done(Exception):
    """Internal: ends the role's TaskGroup (stop requested or max_steps reached)."""


class TrainingRole:
    """Serves a stage and drives microbatches; see the module docstring."""

    def __init__(self, cfg: TrainingConfig, *, transport: Transport, dht: object,
                 on_serving: Callable[[int | None], None] | None = None) -> None:
        self.cfg = cfg
        self.run_cfg = cfg.run
        self.run_id = cfg.run.run_id
        self.transport = transport
        self.dht = dht
        self.me = transport.peer_id
        self.on_serving = on_serving
        self.policy = cfg.run.codecs.policy()
        self.server: StageServer | None = None
        self.view = SwarmView()
        self.rng = random.Random(cfg.seed ^ int.from_bytes(self.me.to_bytes()[-8:], "big"))
        self.selectors = [PeerSelector(cfg.wiring, rng=random.Random(self.rng.random())) for _ in range(cfg.run.pipeline.num_stages)]
        self.data = ShardedData(cfg.run, self.me.to_bytes())
        self.checks = NodeVerification(cfg.run.verification, cfg.verification, run_id=self.run_id,
                                       identity=transport.identity, dht=dht)
        self.client = RemoteStageClient(transport, self.policy, run_id=self.run_id, rpc_timeout_s=cfg.rpc_timeout_s,
                                        local_server=lambda: self.server, collector=self.checks.collector,
                                        witness=self.checks.witness, misbehaviour=self.checks.misbehaviour)
        self.driver = Driver(cfg.driver, num_stages=cfg.run.pipeline.num_stages, client=self.client,
                             peers_of=self._peers_of, selectors=self.selectors, step_of=self._current_step,
                             name=self.me.short())
        self.service = StageService(transport, self.policy, run_id=self.run_id, server_of=lambda: self.server,
                                    witness=self.checks.witness, collector=self.checks.collector,
                                    misbehaviour=self.checks.misbehaviour)
        self.service.register()
        self.tied = TiedService(transport, self.policy, run_id=self.run_id, num_stages=cfg.run.pipeline.num_stages,
                                server_of=lambda: self.server, rpc_timeout_s=cfg.rpc_timeout_s)
        self.tied.register()
        transport.register("step.hint", StepHint, self.rpc_step_hint)
        avg = cfg.run.averaging
        self.averager = Averager(AveragerConfig(
            matchmaking_time_s=cfg.matchmaking_time_s, allreduce_timeout_s=cfg.allreduce_timeout_s,
            codec=cfg.run.codecs.allreduce, rpc_timeout_s=min(cfg.rpc_timeout_s, 5.0), poll_interval_s=0.05,
            reduction=avg.reduction, clip_tau=avg.clip_tau, clip_iterations=avg.clip_iterations,
            inspect_parts=self.checks.inspect_parts,
        ), transport=transport, dht=dht)
        self.my_samples: dict[int, int] = {}
        self.inflight: dict[int, int] = {}
        self.next_index: dict[int, int] = {}
        self.losses: dict[int, list[float]] = {}
        self.started = time.monotonic()
        self.samples_driven = 0
        self.first_sample_time: float | None = None
        self.needs_sync = False
        self._changed = asyncio.Event()
        self._refresh_now = asyncio.Event()
        self._published = 0.0
        self._published_samples: dict[int, int] = {}  # the step and samples of the last published progress record
        self._behind_since: float | None = None
        self._step_opened = time.monotonic()
        self.finished_time: float | None = None  # when max_steps was reached (the run's end, lingering excluded)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event) -> None:
        """Join the run, serve and drive until ``stop_event`` is set or ``max_steps`` is reached."""
        await self.check_run_config()
        await self.refresh_view()
        stage = self.cfg.stage
        if stage is None and self.cfg.role != "trainer":
            stage = choose_stage([StagePeer(peer=p.to_base58(), stage=r.stage, throughput=r.throughput or 1.0)
                                  for p, r in self.view.peers.items() if r.stage is not None],
                                 self.run_cfg.pipeline.num_stages, my_speed=1.0)
        if stage is not None and self.cfg.role != "trainer":
            await self.become(stage)
        await self.publish_record()
        if self.on_serving is not None:
            self.on_serving(self.server.index if self.server else None)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(stop_event))
                tg.create_task(self._view_loop())
                tg.create_task(self._record_loop())
                tg.create_task(self._step_loop())
                tg.create_task(self.checks.run(self._current_step, lambda: self.server.index if self.server else None))
                for worker in range(self.cfg.inflight_microbatches):
                    tg.create_task(self._drive_loop(worker))
                if self.cfg.rebalance_interval_s > 0 and self.cfg.stage is None and self.cfg.role == "auto":
                    tg.create_task(self._rebalance_loop())
        except* _Done:
            pass
        finally:
            self.write_summary()

    async def _watch(self, stop_event: asyncio.Event) -> None:
        while not stop_event.is_set():
            if self.cfg.max_steps is not None and self._current_step() >= self.cfg.max_steps:
                log.info("%s: reached max_steps=%d; stopping", self.me.short(), self.cfg.max_steps)
                self.finished_time = time.time()
                if self.server is not None:
                    await asyncio.to_thread(self.save_checkpoint)
                await self._serve_validators(stop_event, self.cfg.max_steps)
                raise _Done()
            try:
                async with asyncio.timeout(self.cfg.poll_interval_s):
                    await stop_event.wait()
            except TimeoutError:
                pass
        if self.server is not None:
            await asyncio.to_thread(self.save_checkpoint)
        raise _Done()

    async def _serve_validators(self, stop_event: asyncio.Event, max_steps: int) -> None:
        """After ``max_steps``, with validators in the run: keep serving (their ``verify.fetch`` of the last windows'
        work, receipts still to publish) until the last attestable window is attested, at most ``finish_linger_s``.
        Leaving at once would leave that work unchecked, so a cheater's last windows would go unflagged."""
        settings = self.run_cfg.verification
        last = settings.last_attestable_window(max_steps)
        validators = [p for p, r in self.view.peers.items() if r.role == "validator"]
        if not settings.enabled or last < 0 or not validators or self.cfg.finish_linger_s <= 0:
            return
        log.info("%s: serving %d validator(s) until window %d is attested (at most %.0fs)", self.me.short(),
                 len(validators), last, self.cfg.finish_linger_s)
        deadline = time.monotonic() + self.cfg.finish_linger_s
        while not stop_event.is_set() and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(self.cfg.dht_timeout_s):
                    if await fetch_attestations(self.dht, self.run_id, last):
                        log.info("%s: window %d is attested; leaving", self.me.short(), last)
                        return
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: could not read window %d's attestations: %s", self.me.short(), last, e)
            try:
                async with asyncio.timeout(min(1.0, max(deadline - time.monotonic(), 0.01))):
                    await stop_event.wait()
            except TimeoutError:
                pass
        if not stop_event.is_set():
            log.warning("%s: window %d was not attested within %.0fs; leaving anyway", self.me.short(), last,
                        self.cfg.finish_linger_s)

    # ---- joining -------------------------------------------------------------------------------------------

    async def check_run_config(self) -> None:
        """Refuse to join a swarm of the same run name whose config differs (ConfigError names the field)."""
        key = config_key(self.run_cfg.name)
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            found = await self.dht.get(key, latest=True)  # type: ignore[attr-defined]
        value = getattr(found, "value", None)
        if isinstance(value, dict) and value.get("hash") != self.run_cfg.config_hash() and isinstance(value.get("config"), dict):
            self.run_cfg.check_same_run(value["config"])
        await self._store(key, {"hash": self.run_cfg.config_hash(), "config": self.run_cfg.to_dict()}, ttl_s=3600.0)

    async def become(self, stage: int) -> None:
        """Serve ``stage``: build it, then load the newest state (swarm download, else own checkpoint)."""
        model = build_stage(self.run_cfg, stage).to(self.cfg.device)
        optimizer = make_optimizer(model.parameters(), self.run_cfg.optimizer)
        server = StageServer(model, optimizer, self.run_cfg.optimizer,
                             StageServerConfig(max_batch=self.run_cfg.batch.microbatch_size), step=0)
        checkpoint = self._checkpoint_path(stage)
        if checkpoint is not None and checkpoint.exists():
            try:
                state = await asyncio.to_thread(load_state, checkpoint)
                apply_state(model, optimizer, state, run_id=self.run_id, stage=stage)
                server.skip_to(state.step)
                log.info("%s: resumed stage %d at step %d from %s", self.me.short(), stage, state.step, checkpoint)
            except CheckpointError as e:
                log.warning("%s: ignoring checkpoint: %s", self.me.short(), e)
        peer, step = self.view.newest_step(stage)
        if peer is not None and peer != self.me and step > server.step:
            try:
                await self.sync_from(peer, server)
            except (SwarmError, TimeoutError, OSError) as e:  # e.g. its record outlived it: serve, don't die
                self.selectors[stage].report_failure(peer)
                log.warning("%s: state download from %s failed: %s", self.me.short(), peer.short(), e)
                peer = None
        if (peer is None or peer == self.me) and server.step < self.swarm_step():
            log.warning("%s: stage %d has no peer to download its state from; serving %s weights at the swarm's step %d",
                        self.me.short(), stage, "checkpointed" if server.step else "initial", self.swarm_step())
            server.skip_to(self.swarm_step())
        self.server = server
        log.info("%s: serving stage %d of run %s at step %d", self.me.short(), stage, self.run_id, server.step)

    async def sync_from(self, peer: PeerID, server: StageServer) -> None:
        """Download ``server``'s stage state from ``peer`` and load it (stops accepting work while loading)."""
        log.info("%s: downloading stage %d state from %s", self.me.short(), server.index, peer.short())
        state = await call_state_download(self.transport, peer, run_id=self.run_id, stage=server.index,
                                          timeout_s=self.cfg.rpc_timeout_s)

        def load() -> None:
            with server.lock:
                apply_state(server.model, server.optimizer, state, run_id=self.run_id, stage=server.index)
            server.skip_to(state.step)

        await asyncio.to_thread(load)
        log.info("%s: stage %d now at step %d (downloaded from %s)", self.me.short(), server.index, state.step, peer.short())

    # ---- DHT ------------------------------------------------------------------------------------------------

    async def _store(self, key: str, value: object, *, ttl_s: float, subkey: str | None = None) -> None:
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                await self.dht.store(key, value, time.time() + ttl_s, subkey=subkey)  # type: ignore[attr-defined]
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning("%s: could not store %s in the DHT: %s", self.me.short(), key, e)

    async def refresh_view(self) -> None:
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                peers = await self.dht.get(peers_key(self.run_id), latest=True)  # type: ignore[attr-defined]
                progress = await self.dht.get(progress_key(self.run_id), latest=True)  # type: ignore[attr-defined]
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning("%s: could not read the swarm's records: %s", self.me.short(), e)
            return
        self.view = SwarmView.parse(peers, progress)
        self._notify()
        for peer, record in self.view.peers.items():
            if peer == self.me:
                continue
            try:
                self.transport.add_addresses(peer, [parse_maddr(m) for m in record.maddrs])
            except AddressError as e:
                log.warning("%s: stage record of %s has a bad address: %s", self.me.short(), peer.short(), e)

    async def publish_record(self) -> None:
        server = self.server
        record = PeerRecord(role=self.cfg.role, stage=server.index if server else None,
                            maddrs=list(self.transport.listen_maddrs),
                            throughput=server.throughput() if server else 0.0,
                            step=server.step if server else self._current_step(),
                            config_hash=self.run_cfg.config_hash())
        self.view.peers[self.me] = record
        await self._store(peers_key(self.run_id), record.to_wire(), ttl_s=2 * self.cfg.record_period_s,
                          subkey=owner_subkey(self.me))

    async def publish_progress(self, step: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        losses = self.losses.get(step) or []
        record = ProgressRecord(step=step, samples=self.my_samples.get(step, 0), samples_per_s=self.samples_driven / elapsed,
                                loss=sum(losses) / len(losses) if losses else None, time=time.time())
        self.view.progress[self.me] = record
        self._published_samples = {step: record.samples}
        await self._store(progress_key(self.run_id), record.to_wire(), ttl_s=2 * self.cfg.record_period_s + 60,
                          subkey=owner_subkey(self.me))

    async def _publish_final_part(self, step: int, *, closed: bool = False) -> None:
        """Publish this driver's samples of ``step`` unless already published (and, unless ``closed``, once no
        microbatch of it is in flight: after this node's own server closed the step none can count any more).

        A step can close while this driver's last part is unpublished (its other microbatch was still in flight);
        the stages that learn of the step's samples only from progress records would then wait for it forever.
        """
        mine = self.my_samples.get(step, 0)
        if mine == 0 or (self.inflight.get(step, 0) and not closed) or self._published_samples.get(step) == mine:
            return
        self._published = time.monotonic()
        await self.publish_progress(step)
        await self._send_step_hints(step)

    async def _view_loop(self) -> None:
        while True:
            await self.refresh_view()
            try:
                async with asyncio.timeout(self.cfg.view_interval_s):
                    await self._refresh_now.wait()
            except TimeoutError:
                pass
            self._refresh_now.clear()

    async def rpc_step_hint(self, ctx: RpcContext, req: StepHint) -> StepHintReply:
        """A driver says a step's samples look complete: re-read the records now instead of at the next poll."""
        if req.run_id == self.run_id and req.step >= self._current_step():
            self._refresh_now.set()
        return StepHintReply()

    async def _send_step_hints(self, step: int) -> None:
        """Tell every peer of the run that ``step`` looks complete (each call bounded by a short deadline)."""
        hint = StepHint(run_id=self.run_id, step=step)

        async def send(peer: PeerID) -> None:
            try:
                await self.transport.call(peer, "step.hint", hint, StepHintReply, timeout_s=self.cfg.poll_interval_s * 5)
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: step hint to %s failed: %s", self.me.short(), peer.short(), e)

        await asyncio.gather(*(send(p) for p, r in self.view.peers.items() if p != self.me and r.stage is not None))

    async def _record_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.record_period_s * self.rng.uniform(0.8, 1.0))
            await self.publish_record()

    # ---- steps ----------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every loop waiting in `_wait_change` (the view, a step or this node's progress changed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout_s: float) -> None:
        event = self._changed
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass

    def swarm_step(self) -> int:
        """The newest step in any stage record or progress record of the run."""
        steps = [r.step for r in self.view.peers.values()] + [r.step for r in self.view.progress.values()]
        return max(steps, default=0)

    def _current_step(self) -> int:
        if self.server is not None:
            return self.server.step
        steps = [self.view.newest_step(s)[1] for s in range(self.run_cfg.pipeline.num_stages)]
        return max(0, min(steps)) if steps else 0

    def step_samples(self, step: int) -> int:
        others = sum(r.samples for p, r in self.view.progress.items() if p != self.me and r.step == step)
        return others + self.my_samples.get(step, 0)

    async def _step_loop(self) -> None:
        while True:
            await self._wait_change(self.cfg.poll_interval_s)
            server = self.server
            if server is None:
                continue
            if self.step_samples(server.step) >= self.run_cfg.batch.target_batch_size:
                await self.finish_step(server)
            else:
                await self._catch_up(server)

    async def finish_step(self, server: StageServer) -> None:
        """Close the step, average mean gradients with the stage's peers, apply the optimizer, save."""
        step = server.step
        closed = time.monotonic()
        await asyncio.to_thread(server.close_step)
        await self._publish_final_part(step, closed=True)
        grads = self.checks.misbehaviour.gradients(step, await asyncio.to_thread(server.mean_gradients))
        peers = self.view.stage_peers(server.index)
        others = [p for p in peers if p != self.me]
        if others:
            result = await self.averager.step(grads, weight=max(float(server.samples), 1e-3),
                                              group_key=f"{self.run_id}/avg/{server.index}/{step}",
                                              target_group_size=len(others) + 1)
            await self.checks.inspect(step, server.index, result.inspected)
            if not result.with_others:
                log.warning("%s: step %d of stage %d averaged alone (peers: %d); will adopt a peer's next state",
                            self.me.short(), step, server.index, len(others))
                self.needs_sync = True
        averaged = time.monotonic()
        if tied_index(server) is not None:
            other = self.run_cfg.pipeline.num_stages - 1 if server.index == 0 else 0
            await self.tied.combine(server, step, grads, self.rng.sample(self.view.stage_peers(other),
                                                                         len(self.view.stage_peers(other))))
        tied_done = time.monotonic()
        if not (self.needs_sync and await self._adopt_reference_state(server, step + 1)):
            await asyncio.to_thread(server.apply_step, grads)
        self._notify()
        now = time.monotonic()
        elapsed, self._step_opened = now - self._step_opened, now
        log.info("%s: stage %d step %d done (%d samples served in all; %.2fs: %.2fs feeding, %.3fs averaging, "
                 "%.3fs tied, %.3fs optimizer)", self.me.short(), server.index, step, server.total_samples, elapsed,
                 closed - (now - elapsed), averaged - closed, tied_done - averaged, now - tied_done)
        if server.step % self.cfg.save_every_steps == 0:
            await asyncio.to_thread(self.save_checkpoint)
        await self.publish_record()

    async def _catch_up(self, server: StageServer) -> None:
        peer, newest = self.view.newest_step(server.index)
        now = time.monotonic()
        # strictly ahead: a server's weights change only together with its step, so that validators replaying
        # a step's work with the weights they downloaded for that step never see two versions of them
        ahead = peer is not None and peer != self.me and newest >= server.step + 1
        if not ahead and self.swarm_step() <= server.step + 1:
            self._behind_since = None
            return
        if self._behind_since is None:
            self._behind_since = now
        if not ahead and now - self._behind_since >= self.cfg.behind_grace_s:
            # the whole stage fell behind the drivers (e.g. its peers were lost): nobody to download from
            log.warning("%s: stage %d is at step %d, the swarm at %d, and no peer of the stage is ahead; jumping",
                        self.me.short(), server.index, server.step, self.swarm_step())
            await asyncio.to_thread(server.skip_to, self.swarm_step())
            self._behind_since = None
        elif ahead and (self.needs_sync or now - self._behind_since >= self.cfg.behind_grace_s):
            try:
                await asyncio.to_thread(server.close_step)
                await self.sync_from(peer, server)
                self.needs_sync = False
            except (SwarmError, TimeoutError, OSError) as e:
                self.selectors[server.index].report_failure(peer)
                log.warning("%s: state download from %s failed: %s", self.me.short(), peer.short(), e)
                await asyncio.to_thread(server.skip_to, server.step)
            self._behind_since = None
            await self.publish_record()

    async def _adopt_reference_state(self, server: StageServer, next_step: int) -> bool:
        """After averaging alone, at the step boundary: load the state of ``next_step`` from a peer of the stage
        (the one with the smallest PeerID first) instead of applying this node's own update, so the replicas meet
        again. The reference replica (smallest PeerID) keeps its own. False: apply the own update (no peer got
        there within ``behind_grace_s``; the next boundary tries again)."""
        deadline = time.monotonic() + self.cfg.behind_grace_s
        while time.monotonic() < deadline:
            peers = sorted(self.view.stage_peers(server.index), key=lambda p: p.to_bytes())
            if not peers or peers[0] == self.me:
                self.needs_sync = False
                return False
            for peer in peers:
                record = self.view.peers.get(peer)
                if peer == self.me or record is None or record.step < next_step:
                    continue
                try:
                    await self.sync_from(peer, server)
                    self.needs_sync = False
                    return True
                except (SwarmError, TimeoutError, OSError) as e:
                    self.selectors[server.index].report_failure(peer)
                    log.warning("%s: state download from %s failed: %s", self.me.short(), peer.short(), e)
            await self._wait_change(self.cfg.poll_interval_s)
        log.warning("%s: no peer of stage %d reached step %d within %.1fs; applying own update", self.me.short(),
                    server.index, next_step, self.cfg.behind_grace_s)
        return False

    # ---- driving --------------------------------------------------------------------------------------------

    def _peers_of(self, stage: int) -> list[PeerID]:
        if self.server is not None and self.server.index == stage:
            return [self.me]
        return self.view.stage_peers(stage)

    def _may_start(self, step: int) -> bool:
        """Feed at most a fair share of the step (target / drivers), or what is left once others did theirs
        or the step has stalled for ``behind_grace_s`` (a driver left)."""
        target, micro = self.run_cfg.batch.target_batch_size, self.run_cfg.batch.microbatch_size
        mine = self.my_samples.get(step, 0) + self.inflight.get(step, 0)
        others = self.step_samples(step) - self.my_samples.get(step, 0)
        if mine + others >= target:
            return False
        drivers = sum(1 for r in self.view.peers.values() if r.role == "trainer" or (r.role == "auto" and r.stage == 0))
        fair = -(-target // max(drivers, 1) // micro) * micro if drivers > 1 else target
        stalled = time.monotonic() - self._step_opened > self.cfg.behind_grace_s
        return mine < fair or others >= target - fair or stalled

    async def _drive_loop(self, worker: int) -> None:
        while True:
            serving_first = self.server is not None and self.server.index == 0
            if not (self.cfg.role == "trainer" or (self.cfg.role == "auto" and serving_first)):
                await asyncio.sleep(self.cfg.poll_interval_s)
                continue
            step = self._current_step()
            if self.first_sample_time is None and len(self.view.peers) < self.cfg.start_after_peers:
                await asyncio.sleep(self.cfg.poll_interval_s / 2)  # a start gate only: later departures don't stop us
                continue
            if (not self._may_start(step)
                    or self.cfg.max_steps is not None and step >= self.cfg.max_steps):
                await self._wait_change(self.cfg.poll_interval_s / 2)
                continue
            index = self.next_index.get(step, 0)
            self.next_index[step] = index + 1
            mb = await asyncio.to_thread(self.data.microbatch, step, index)
            if self.first_sample_time is None:
                self.first_sample_time = time.time()
            self.inflight[step] = self.inflight.get(step, 0) + mb.num_samples
            try:
                loss = await self.driver.run_microbatch(mb)
            except StaleStepError:
                loss = None
            except NoPeerError as e:
                missing = [s for s in range(self.run_cfg.pipeline.num_stages) if not self._peers_of(s)]
                log.warning("%s: %s; stages without a peer: %s; waiting", self.me.short(), e, missing or "none")
                await asyncio.sleep(1.0)
                continue
            finally:
                self.inflight[step] -= mb.num_samples
            if loss is None:  # the step closed first: the others must still see this driver's whole part of it
                await self._publish_final_part(step)
                continue
            self.my_samples[step] = self.my_samples.get(step, 0) + mb.num_samples
            self.samples_driven += mb.num_samples
            self.losses.setdefault(step, []).append(loss)
            self._notify()
            # publish when this driver's part of the step is done (others wait for it), else at most every second
            if (self.inflight.get(step, 0) == 0 and not self._may_start(step)) or time.monotonic() - self._published > 1.0:
                self._published = time.monotonic()
                await self.publish_progress(step)
                await self.refresh_view()  # the others' latest parts: is the step complete now?
                if self.step_samples(step) >= self.run_cfg.batch.target_batch_size:
                    await self._send_step_hints(step)

    # ---- rebalancing ----------------------------------------------------------------------------------------

    async def _rebalance_loop(self) -> None:
        while True:
            due = time.monotonic() + self.cfg.rebalance_interval_s * self.rng.uniform(0.5, 1.5)
            while time.monotonic() < due:  # a stage left empty is checked soon, with jitter so peers don't all move
                await asyncio.sleep(self.cfg.poll_interval_s)
                if any(not self.view.stage_peers(s) for s in range(self.run_cfg.pipeline.num_stages)):
                    due = min(due, time.monotonic() + self.cfg.poll_interval_s * 10 * self.rng.uniform(0.5, 1.5))
            await self.refresh_view()
            server = self.server
            if server is None or self.finished_time is not None:
                continue
            peers = [StagePeer(peer=p.to_base58(), stage=r.stage, throughput=r.throughput or self.cfg.balance.default_throughput)
                     for p, r in self.view.peers.items() if r.stage is not None]
            target = choose_move(peers, self.run_cfg.pipeline.num_stages, me=self.me.to_base58(), cfg=self.cfg.balance)
            if target is not None:
                log.info("%s: moving from stage %d to stage %d to raise the swarm's bottleneck",
                         self.me.short(), server.index, target)
                await asyncio.to_thread(server.close_step)
                await asyncio.to_thread(self.save_checkpoint)
                self.server = None
                await self.become(target)
                await self.publish_record()

    # ---- persistence ----------------------------------------------------------------------------------------

    def _checkpoint_path(self, stage: int) -> Path | None:
        return None if self.cfg.checkpoint_dir is None else self.cfg.checkpoint_dir / f"stage-{stage}.safetensors"

    def save_checkpoint(self) -> None:
        server = self.server
        path = None if server is None else self._checkpoint_path(server.index)
        if server is None or path is None:
            return
        with server.lock:
            state = capture_state(server.model, server.optimizer, run_id=self.run_id, stage=server.index, step=server.step)
        save_state(path, state)
        log.info("%s: saved stage %d at step %d to %s", self.me.short(), server.index, server.step, path)

    def write_summary(self) -> None:
        """Write the node's losses and counts as JSON (the launcher aggregates them)."""
        if self.cfg.summary_path is None:
            return
        summary = {
            "peer_id": self.me.to_base58(), "role": self.cfg.role,
            "stage": self.server.index if self.server else None, "step": self._current_step(),
            "losses": {str(k): v for k, v in sorted(self.losses.items())},
            "samples": self.samples_driven, "elapsed_s": time.monotonic() - self.started,
            "first_sample_time": self.first_sample_time, "end_time": self.finished_time or time.time(),
            "loss_floor": self.data.loss_floor, "run_id": self.run_id,
            "served_samples": self.server.total_samples if self.server else 0,
            "verification": self.checks.summary(),
        }
        tmp = self.cfg.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary))
        tmp.replace(self.cfg.summary_path)

