"""The node's training role: serve a stage, drive microbatches, publish records, close steps, keep in sync.

One `TrainingRole` per node, on the node's transport and DHT. `run(stop_event)` checks the run config against the
swarm's, picks a stage (``stage=None``: the weakest), loads its state (checkpoint, or a download from the peer of
the stage with the newest step), then runs its loops in one TaskGroup until ``stop_event`` is set or ``max_steps``
is reached:

- view: read ``{run}/peers`` and ``{run}/progress`` every ``view_interval_s``, and at once on a ``step.hint``;
- records: publish this node's `PeerRecord` every ``record_period_s`` (expiry twice that);
- steps: when the step's samples reach the target batch size, average gradients with the stage's peers
  (weighted by samples) and apply the optimizer; download state when fallen behind;
- drivers (stage-0 nodes and trainers): push microbatches of this node's shard (`swarm.training.driver`);
- rebalance: at randomized intervals, move to another stage when that clearly raises the bottleneck.

This file holds the role's state and lifecycle (`run`, stopping at ``max_steps`` and serving validators until the
last window is attested), joining (`check_run_config`, `become`, `sync_from`), checkpoints and the summary. The
loops live in mixins that share this state: `swarm.training.trainer_records.RecordsMixin` (view, records, step hints),
`swarm.training.trainer_steps.StepsMixin` (closing, averaging and catching up steps) and
`swarm.training.trainer_driving.DrivingMixin` (driving microbatches, rebalancing).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from swarm.p2p.identity import PeerID
from swarm.p2p import Transport
from swarm.averaging import Averager, AveragerConfig
from swarm.training.balancing import StagePeer, choose_stage
from swarm.training.checkpoint import CheckpointError, apply_state, capture_state, load_state, save_state
from swarm.data import ShardedData
from swarm.training.driver import Driver
from swarm.training.node_role import Role
from swarm.errors import SwarmError
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stage
from swarm.training.progress import StepHint
from swarm.training.stage_rpc import RemoteStageClient, StageService, call_state_download
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.summary import NodeSummary
from swarm.training.tied import TiedService
from swarm.training.trainer_driving import DrivingMixin
from swarm.training.trainer_records import RecordsMixin
from swarm.training.trainer_steps import StepsMixin
from swarm.training.training_config import TrainingConfig
from swarm.training.view import SwarmView, config_key
from swarm.training.verifying import NodeVerification
from swarm.training.wiring import PeerSelector
from swarm.verification.attestation import fetch_attestations

log = logging.getLogger(__name__)


class _Done(Exception):
    """Internal: ends the role's TaskGroup (stop requested or max_steps reached)."""


class TrainingRole(RecordsMixin, StepsMixin, DrivingMixin):
    """Serves a stage and drives microbatches; see the module docstring."""

    def __init__(
        self,
        cfg: TrainingConfig,
        *,
        transport: Transport,
        dht: object,
        on_serving: Callable[[int | None], None] | None = None,
    ) -> None:
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
        self.selectors = [
            PeerSelector(cfg.wiring, rng=random.Random(self.rng.random())) for _ in range(cfg.run.pipeline.num_stages)
        ]
        self.data = ShardedData(cfg.run, self.me.to_bytes())
        self.checks = NodeVerification(
            cfg.run.verification, cfg.verification, run_id=self.run_id, identity=transport.identity, dht=dht
        )
        self.client = RemoteStageClient(
            transport,
            self.policy,
            run_id=self.run_id,
            rpc_timeout_s=cfg.rpc_timeout_s,
            local_server=lambda: self.server,
            collector=self.checks.collector,
            witness=self.checks.witness,
            misbehaviour=self.checks.misbehaviour,
        )
        self.driver = Driver(
            cfg.driver,
            num_stages=cfg.run.pipeline.num_stages,
            client=self.client,
            peers_of=self._peers_of,
            selectors=self.selectors,
            step_of=self._current_step,
            name=self.me.short(),
        )
        self.service = StageService(
            transport,
            self.policy,
            run_id=self.run_id,
            server_of=lambda: self.server,
            witness=self.checks.witness,
            collector=self.checks.collector,
            misbehaviour=self.checks.misbehaviour,
            refuse=lambda peer: peer in self.checks.offenders(),
        )
        self.service.register()
        self.tied = TiedService(
            transport,
            self.policy,
            run_id=self.run_id,
            num_stages=cfg.run.pipeline.num_stages,
            server_of=lambda: self.server,
            rpc_timeout_s=cfg.rpc_timeout_s,
            retie_every_steps=cfg.run.pipeline.retie_every_steps,
        )
        self.tied.register()
        transport.register("step.hint", StepHint, self.rpc_step_hint)
        avg = cfg.run.averaging
        self.averager = Averager(
            AveragerConfig(
                matchmaking_time_s=cfg.matchmaking_time_s,
                allreduce_timeout_s=cfg.allreduce_timeout_s,
                codec=cfg.run.codecs.allreduce,
                rpc_timeout_s=min(cfg.rpc_timeout_s, 5.0),
                poll_interval_s=0.05,
                reduction=avg.reduction,
                clip_tau=avg.clip_tau,
                clip_iterations=avg.clip_iterations,
                inspect_parts=self.checks.inspect_parts,
            ),
            transport=transport,
            dht=dht,
        )
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
        if stage is None and self.cfg.role != Role.TRAINER:
            stage = choose_stage(
                [
                    StagePeer(peer=p.to_base58(), stage=r.stage, throughput=r.throughput or 1.0)
                    for p, r in self.view.peers.items()
                    if r.stage is not None
                ],
                self.run_cfg.pipeline.num_stages,
                my_speed=1.0,
            )
        if stage is not None and self.cfg.role != Role.TRAINER:
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
                # a --misbehave demo node stays on the stage it joined: the demo measures detection, not a chase
                if (
                    self.cfg.rebalance_interval_s > 0
                    and self.cfg.stage is None
                    and self.cfg.role == Role.AUTO
                    and self.checks.misbehaviour.kind is None
                ):
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
        validators = [p for p, r in self.view.peers.items() if r.role == Role.VALIDATOR]
        if not settings.enabled or last < 0 or not validators or self.cfg.finish_linger_s <= 0:
            return
        log.info(
            "%s: serving %d validator(s) until window %d is attested (at most %.0fs)",
            self.me.short(),
            len(validators),
            last,
            self.cfg.finish_linger_s,
        )
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
            log.warning(
                "%s: window %d was not attested within %.0fs; leaving anyway",
                self.me.short(),
                last,
                self.cfg.finish_linger_s,
            )

    # ---- joining -------------------------------------------------------------------------------------------

    async def check_run_config(self) -> None:
        """Refuse to join a swarm of the same run name whose config differs (ConfigError names the field)."""
        key = config_key(self.run_cfg.name)
        async with asyncio.timeout(self.cfg.dht_timeout_s):
            found = await self.dht.get(key, latest=True)  # type: ignore[attr-defined]
        value = getattr(found, "value", None)
        if (
            isinstance(value, dict)
            and value.get("hash") != self.run_cfg.config_hash()
            and isinstance(value.get("config"), dict)
        ):
            self.run_cfg.check_same_run(value["config"])
        await self._store(key, {"hash": self.run_cfg.config_hash(), "config": self.run_cfg.to_dict()}, ttl_s=3600.0)

    async def become(self, stage: int) -> None:
        """Serve ``stage``: build it, then load the newest state (swarm download, else own checkpoint)."""
        model = build_stage(self.run_cfg, stage).to(self.cfg.device)
        optimizer = make_optimizer(model.parameters(), self.run_cfg.optimizer)
        server = StageServer(
            model,
            optimizer,
            self.run_cfg.optimizer,
            StageServerConfig(max_batch=self.run_cfg.batch.microbatch_size),
            step=0,
        )
        checkpoint = self._checkpoint_path(stage)
        if checkpoint is not None and checkpoint.exists():
            try:
                state = await asyncio.to_thread(load_state, checkpoint)
                apply_state(model, optimizer, state, run_id=self.run_id, stage=stage)
                server.skip_to(state.step)
                log.info("%s: resumed stage %d at step %d from %s", self.me.short(), stage, state.step, checkpoint)
            except CheckpointError as e:
                log.warning("%s: ignoring checkpoint: %s", self.me.short(), e)
        peer, step = self.view.newest_step(stage, exclude=self.checks.offenders())
        if peer is not None and peer != self.me and step > server.step:
            try:
                await self.sync_from(peer, server)
            except (SwarmError, TimeoutError, OSError) as e:  # e.g. its record outlived it: serve, don't die
                self.selectors[stage].report_failure(peer)
                log.warning("%s: state download from %s failed: %s", self.me.short(), peer.short(), e)
                peer = None
        if (peer is None or peer == self.me) and server.step < self.swarm_step():
            log.warning(
                "%s: stage %d has no peer to download its state from; serving %s weights at the swarm's step %d",
                self.me.short(),
                stage,
                "checkpointed" if server.step else "initial",
                self.swarm_step(),
            )
            server.skip_to(self.swarm_step())
        self.server = server
        log.info("%s: serving stage %d of run %s at step %d", self.me.short(), stage, self.run_id, server.step)

    async def sync_from(self, peer: PeerID, server: StageServer) -> None:
        """Download ``server``'s stage state from ``peer`` and load it (stops accepting work while loading)."""
        log.info("%s: downloading stage %d state from %s", self.me.short(), server.index, peer.short())
        state = await call_state_download(
            self.transport, peer, run_id=self.run_id, stage=server.index, timeout_s=self.cfg.rpc_timeout_s
        )

        def load() -> None:
            with server.lock:
                apply_state(server.model, server.optimizer, state, run_id=self.run_id, stage=server.index)
            server.skip_to(state.step)

        await asyncio.to_thread(load)
        log.info(
            "%s: stage %d now at step %d (downloaded from %s)", self.me.short(), server.index, state.step, peer.short()
        )

    # ---- persistence ----------------------------------------------------------------------------------------

    def _checkpoint_path(self, stage: int) -> Path | None:
        return None if self.cfg.checkpoint_dir is None else self.cfg.checkpoint_dir / f"stage-{stage}.safetensors"

    def save_checkpoint(self) -> None:
        """Save the served stage's state to its checkpoint file (nothing without a server or ``checkpoint_dir``)."""
        server = self.server
        path = None if server is None else self._checkpoint_path(server.index)
        if server is None or path is None:
            return
        with server.lock:
            state = capture_state(
                server.model, server.optimizer, run_id=self.run_id, stage=server.index, step=server.step
            )
        save_state(path, state)
        log.info("%s: saved stage %d at step %d to %s", self.me.short(), server.index, server.step, path)

    def write_summary(self) -> None:
        """Write the node's losses and counts as JSON (the launcher aggregates them)."""
        if self.cfg.summary_path is None:
            return
        summary = NodeSummary(
            peer_id=self.me.to_base58(),
            role=self.cfg.role,
            stage=self.server.index if self.server else None,
            step=self._current_step(),
            losses={k: list(v) for k, v in sorted(self.losses.items())},
            samples=self.samples_driven,
            elapsed_s=time.monotonic() - self.started,
            first_sample_time=self.first_sample_time,
            end_time=self.finished_time or time.time(),
            loss_floor=self.data.loss_floor,
            run_id=self.run_id,
            served_samples=self.server.total_samples if self.server else 0,
            verification=self.checks.summary(),
        )
        summary.write(self.cfg.summary_path)
