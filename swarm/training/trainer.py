"""The node's training role: serve a stage, drive microbatches, publish records, close steps, keep in sync.

One role per node, on the node's transport and DHT, built by `build_training_role`, which also registers every
RPC handler the role serves; `TrainingRole.stop` unregisters them all. `run(stop_event)` checks the run config
against the swarm's, picks a stage (``stage=None``: the weakest), loads its state (checkpoint, or a download from
the peer of the stage with the newest step), then runs its loops in one TaskGroup (`swarm.training.runloop`) until
``stop_event`` is set or ``max_steps`` is reached:

- view: read ``{run}/peers`` and ``{run}/progress`` every ``view_interval_s``; drivers also tell their progress to
  the run's peers directly (``step.hint``), so a step closes without waiting for the DHT;
- records: publish this node's `PeerRecord` every ``record_period_s`` (expiry twice that);
- steps: when the step's samples reach the target batch size, average gradients with the stage's peers
  (weighted by samples) and apply the optimizer; download state when fallen behind;
- drivers (stage-0 nodes and trainers): push microbatches of this node's shard (`swarm.training.driver`);
- evaluation: the validation loss every ``eval.every_steps`` steps, by one driver (`swarm.training.evaluating`);
- rebalance: at randomized intervals, move to another stage when that clearly raises the bottleneck.

The parts are collaborators sharing one `swarm.training.state.TrainerState`: `RunRecords` (records and view),
`StateSync` (joining, state downloads, checkpoints), `Stepper` (closing, averaging, catching up), `Driving` and
`Rebalancer`. This module holds the role's lifecycle: joining, stopping at ``max_steps`` (serving validators until
the last window is attested), the summary, and the one function that builds it all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from swarm.averaging import Averager, AveragerConfig
from swarm.data import ShardedData
from swarm.dht import DHT
from swarm.training.node_role import Role
from swarm.errors import SwarmError
from swarm.model.devices import check_precision, resolve_device
from swarm.model.precision import compute_dtype
from swarm.p2p import Transport
from swarm.p2p.traffic import TrafficSnapshot
from swarm.p2p.identity import PeerID
from swarm.training.driving import Driving
from swarm.training.eval_rpc import EvalClient, EvalService
from swarm.training.evaluating import Evaluation
from swarm.training.hooks import HONEST, NodeHooks
from swarm.training.progress import StepHint
from swarm.training.rebalancing import Rebalancer
from swarm.training.records import STEP_HINT_METHOD, RunRecords
from swarm.training.replicas import ReplicaDivergedError
from swarm.training.runloop import RunLoop, run_key_prefixes, unprotect_run_peers
from swarm.training.stage_rpc import RemoteStageClient, StageService
from swarm.training.state import TrainerState
from swarm.training.stepping import Stepper
from swarm.training.sync import StateSync
from swarm.training.summary import NodeSummary, TrafficSummary, peak_rss_bytes
from swarm.training.tied import TiedService
from swarm.training.training_config import TrainingConfig
from swarm.training.verifying import NodeVerification
from swarm.training.wiring import PeerSelector
from swarm.verification.attestation import fetch_attestations

__all__ = ["TrainingConfig", "TrainingRole", "build_training_role"]

log = logging.getLogger(__name__)


class TrainingRole(RunLoop):
    """Serves a stage and drives microbatches; see the module docstring. Built by `build_training_role`."""

    def __init__(
        self,
        state: TrainerState,
        *,
        records: RunRecords,
        sync: StateSync,
        stepper: Stepper,
        driving: Driving,
        evaluation: Evaluation,
        rebalancer: Rebalancer,
        checks: NodeVerification,
        unregister: list[Callable[[], None]],
        on_serving: Callable[[int | None], None] | None = None,
    ) -> None:
        super().__init__(poll_interval_s=state.cfg.poll_interval_s, summary_path=state.cfg.summary_path)
        self.state = state
        self.records = records
        self.sync = sync
        self.stepper = stepper
        self.driving = driving
        self.evaluation = evaluation
        self.rebalancer = rebalancer
        self.checks = checks
        self.on_serving = on_serving
        self._unregister = unregister  # undoes every registration `build_training_role` made, in reverse order
        self._traffic_start = (state.transport.traffic.snapshot(), 0)  # counted from here (bytes, step)
        self._traffic_end: tuple[TrafficSnapshot, int] | None = None  # taken at max_steps (lingering left out)

    async def run(self, stop_event: asyncio.Event) -> None:
        """Join the run, serve and drive until ``stop_event`` is set or ``max_steps`` is reached."""
        st, cfg = self.state, self.state.cfg
        st.dht.prefer_prefixes(run_key_prefixes(st.run_id, st.run_cfg.name))  # evicted last when storage is full
        await self.sync.check_run_config()
        await self.records.refresh_view()
        stage = self.sync.first_stage()
        if stage is not None:
            await self.sync.become(stage)
        self._traffic_start = (self._traffic_start[0], st.current_step())  # a loaded state's step is not counted
        await self.records.publish_record()
        if self.on_serving is not None:
            self.on_serving(st.stage())
        loops = [
            self.records.outbox_loop(),
            self.records.record_loop(),
            self.stepper.step_loop(),
            self.checks.run(st.current_step, st.stage),
            *(self.driving.drive_loop(worker) for worker in range(cfg.inflight_microbatches)),
        ]
        if (
            cfg.rebalance_interval_s > 0
            and cfg.stage is None
            and cfg.role == Role.AUTO
            and self.checks.hooks.rebalances
        ):
            loops.append(self.rebalancer.rebalance_loop())
        try:
            await self.run_loops(stop_event, loops)
        except* ReplicaDivergedError as group:  # the role's own reason to stop: raised as itself, not as a group
            raise group.exceptions[0] from None

    def stop(self) -> None:
        """Stop serving: unregister every RPC handler of the role and drop the protection of the run's peers'
        connections (the transport is shared and stays up)."""
        while self._unregister:
            self._unregister.pop()()
        unprotect_run_peers(self.state.transport)

    # ---- the run loop's hooks ------------------------------------------------------------------------------

    async def refresh_view(self) -> bool:
        return await self.records.refresh_view()

    async def _next_view(self) -> None:
        await self.records.wait_refresh()

    async def _is_over(self, stop_event: asyncio.Event) -> bool:
        """At ``max_steps``: save, serve the validators until the last window is attested, and end."""
        st, max_steps = self.state, self.state.cfg.max_steps
        if max_steps is None or st.current_step() < max_steps:
            return False
        log.info("%s: reached max_steps=%d; stopping", st.me.short(), max_steps)
        st.finished_time = time.time()
        self._traffic_end = (st.transport.traffic.snapshot(), st.current_step())
        serving_first = st.server is not None and st.server.index == 0
        driver = st.cfg.role == Role.TRAINER or (st.cfg.role == Role.AUTO and serving_first)
        await self.evaluation.final(max_steps, driver=driver)
        if st.server is not None:
            await asyncio.to_thread(self.sync.save_checkpoint)
        # the step loop's own publication of the last step may be cancelled when this returns: publish it here
        await self.records.publish_record()
        await self._serve_validators(stop_event, max_steps)
        return True

    async def _stopping(self) -> None:
        if self.state.server is not None:
            await asyncio.to_thread(self.sync.save_checkpoint)

    async def _serve_validators(self, stop_event: asyncio.Event, max_steps: int) -> None:
        """After ``max_steps``, with validators in the run: keep serving (their ``verify.fetch`` of the last windows'
        work, receipts still to publish) until the last attestable window is attested, at most ``finish_linger_s``.
        Leaving at once would leave that work unchecked, so a cheater's last windows would go unflagged."""
        st, cfg = self.state, self.state.cfg
        settings = st.run_cfg.verification
        last = settings.last_attestable_window(max_steps)
        validators = [p for p, r in st.view.peers.items() if r.role == Role.VALIDATOR]
        if not settings.enabled or last < 0 or not validators or cfg.finish_linger_s <= 0:
            return
        log.info(
            "%s: serving %d validator(s) until window %d is attested (at most %.0fs)",
            st.me.short(),
            len(validators),
            last,
            cfg.finish_linger_s,
        )
        deadline = time.monotonic() + cfg.finish_linger_s
        while not stop_event.is_set() and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(cfg.dht_timeout_s):
                    if await fetch_attestations(st.dht, st.run_id, last):
                        log.info("%s: window %d is attested; leaving", st.me.short(), last)
                        return
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: could not read window %d's attestations: %s", st.me.short(), last, e)
            try:
                async with asyncio.timeout(min(1.0, max(deadline - time.monotonic(), 0.01))):
                    await stop_event.wait()
            except TimeoutError:
                pass
        if not stop_event.is_set():
            log.warning(
                "%s: window %d was not attested within %.0fs; leaving anyway", st.me.short(), last, cfg.finish_linger_s
            )

    def summary(self) -> NodeSummary:
        """The node's losses and counts (the launcher aggregates them)."""
        st = self.state
        return NodeSummary(
            peer_id=st.me.to_base58(),
            role=st.cfg.role,
            stage=st.server.index if st.server else None,
            step=st.current_step(),
            losses={k: list(v) for k, v in sorted(st.losses.items())},
            eval_losses=dict(sorted(st.eval_losses.items())),
            samples=st.samples_driven,
            elapsed_s=time.monotonic() - st.started,
            first_sample_time=st.first_sample_time,
            end_time=st.finished_time or time.time(),
            step_times=dict(st.step_times),
            loss_floor=self.driving.data.loss_floor,
            run_id=st.run_id,
            served_samples=st.server.total_samples if st.server else 0,
            verification=self.checks.summary(),
            device=st.cfg.device,
            precision=st.run_cfg.precision.compute,
            peak_rss_bytes=peak_rss_bytes(),
            traffic=self.traffic(),
        )

    def traffic(self) -> TrafficSummary:
        """The bytes this node's transport counted from the role's start to max_steps (or now), per family."""
        start, start_step = self._traffic_start
        end, end_step = self._traffic_end or (self.state.transport.traffic.snapshot(), self.state.current_step())
        return TrafficSummary.of(end.minus(start), end_step - start_step)


def build_training_role(
    cfg: TrainingConfig,
    *,
    transport: Transport,
    dht: DHT,
    on_serving: Callable[[int | None], None] | None = None,
    hooks: NodeHooks = HONEST,
) -> TrainingRole:
    """The training role on ``transport`` and ``dht``: its state, its collaborators, and every RPC handler it serves
    registered (``stage.*`` with ``stage.eval``, ``state.download``, ``stage.tied``, ``step.hint``, ``verify.fetch``
    with verification on, ``avg.*``); `TrainingRole.stop` unregisters them. ``cfg.device`` ``auto`` is resolved here
    (ConfigError if the device is not there, or cannot compute in the run's precision)."""
    me = transport.peer_id
    cfg = _with_device(cfg, me)
    rng = random.Random(cfg.seed ^ int.from_bytes(me.to_bytes()[-8:], "big"))
    selectors: list[PeerSelector[PeerID]] = [
        PeerSelector(cfg.wiring, rng=random.Random(rng.random())) for _ in range(cfg.run.pipeline.num_stages)
    ]
    state = TrainerState(cfg=cfg, transport=transport, dht=dht, rng=rng, selectors=selectors)
    checks = NodeVerification(
        cfg.run.verification, cfg.verification, run_id=cfg.run.run_id, identity=transport.identity, dht=dht, hooks=hooks
    )
    records = RunRecords(state)
    sync = StateSync(state, records=records, checks=checks)
    client = RemoteStageClient(
        transport,
        cfg.run.codecs.policy(),
        run_id=cfg.run.run_id,
        rpc_timeout_s=cfg.rpc_timeout_s,
        local_server=lambda: state.server,
        collector=checks.collector,
        witness=checks.witness,
        hooks=checks.hooks,
        activation_dtype=compute_dtype(cfg.run.precision.compute),
    )
    driving = Driving(state, records=records, checks=checks, client=client, data=ShardedData(cfg.run, me.to_bytes()))
    evaluator = EvalClient(
        transport,
        cfg.run.codecs.policy(),
        run_id=cfg.run.run_id,
        rpc_timeout_s=cfg.rpc_timeout_s,
        local_server=lambda: state.server,
    )
    evaluation = Evaluation(state, records=records, driver=driving.driver, evaluator=evaluator, data=driving.data)
    driving.before_step = evaluation.before_step
    unregister: list[Callable[[], None]] = []
    try:
        tied, averager = _register_handlers(state, records=records, checks=checks, unregister=unregister)
    except BaseException:
        while unregister:  # e.g. another role still serves on this transport: leave it as it was
            unregister.pop()()
        raise
    return TrainingRole(
        state,
        records=records,
        sync=sync,
        stepper=Stepper(state, records=records, sync=sync, checks=checks, averager=averager, tied=tied),
        driving=driving,
        evaluation=evaluation,
        rebalancer=Rebalancer(state, records=records, sync=sync),
        checks=checks,
        unregister=unregister,
        on_serving=on_serving,
    )


def _with_device(cfg: TrainingConfig, me: PeerID) -> TrainingConfig:
    """``cfg`` with its device resolved (`swarm.model.devices.resolve_device`), and checked for the precision."""
    device = resolve_device(cfg.device)
    check_precision(device, cfg.run.precision.compute)
    log.info(
        "%s: stage compute on %s (requested %s), precision %s",
        me.short(),
        device,
        cfg.device,
        cfg.run.precision.compute,
    )
    return cfg if device == cfg.device else dataclasses.replace(cfg, device=device)


def _register_handlers(
    state: TrainerState, *, records: RunRecords, checks: NodeVerification, unregister: list[Callable[[], None]]
) -> tuple[TiedService, Averager]:
    """Register every RPC handler of the role, appending to ``unregister`` how to undo each registration."""
    cfg, transport = state.cfg, state.transport
    policy = cfg.run.codecs.policy()
    service = StageService(
        transport,
        policy,
        run_id=state.run_id,
        server_of=lambda: state.server,
        witness=checks.witness,
        collector=checks.collector,
        hooks=checks.hooks,
        refuse=lambda peer: peer in checks.offenders(),
        wait_step=lambda step: state.wait_step(step, cfg.next_step_hold_s),
    )
    service.register()
    unregister.append(service.unregister)
    evals = EvalService(transport, policy, run_id=state.run_id, server_of=lambda: state.server)
    evals.register()
    unregister.append(evals.unregister)
    tied = TiedService(
        transport,
        policy,
        run_id=state.run_id,
        num_stages=cfg.run.pipeline.num_stages,
        server_of=lambda: state.server,
        rpc_timeout_s=cfg.rpc_timeout_s,
        retie_every_steps=cfg.run.pipeline.retie_every_steps,
        lag_steps=1 if cfg.run.averaging.delayed_update else 0,
    )
    tied.register()
    unregister.append(tied.unregister)
    transport.register(STEP_HINT_METHOD, StepHint, records.rpc_step_hint)
    unregister.append(lambda: transport.unregister(STEP_HINT_METHOD))
    averager = Averager(_averager_config(cfg, checks), transport=transport, dht=state.dht)  # registers ``avg.*``
    unregister.append(averager.unregister)
    return tied, averager


def _averager_config(cfg: TrainingConfig, checks: NodeVerification) -> AveragerConfig:
    avg = cfg.run.averaging
    return AveragerConfig(
        matchmaking_time_s=cfg.matchmaking_time_s,
        allreduce_timeout_s=cfg.allreduce_timeout_s,
        codec=_averager_codec(cfg),
        rpc_timeout_s=min(cfg.rpc_timeout_s, 5.0),
        poll_interval_s=0.05,
        reduction=avg.reduction,
        clip_tau=avg.clip_tau,
        clip_iterations=avg.clip_iterations,
        inspect_parts=checks.inspect_parts,
    )


def _averager_codec(cfg: TrainingConfig) -> str:
    """The all-reduce codec: the run's ``codecs.allreduce``, or ``sparse`` (lossless, for the top-k quantized
    pseudo-gradients) in local_sgd mode with ``outer_compression = "topk_q"``."""
    avg = cfg.run.averaging
    return "sparse" if avg.local_sgd and avg.outer_compression == "topk_q" else cfg.run.codecs.allreduce
