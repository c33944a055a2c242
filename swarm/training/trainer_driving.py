"""The training role's driving and rebalancing loops (`DrivingMixin`).

Mixed into `swarm.training.trainer.TrainingRole`, whose state it shares (see the class body for what it reads):

- drivers (stage-0 nodes and trainers): each of ``inflight_microbatches`` workers pushes microbatches of this
  node's shard through the pipeline (`swarm.training.driver.Driver`), feeding at most a fair share of the step, and
  publishes this driver's part of the step when it is done;
- rebalance: at randomized intervals, move to another stage when that clearly raises the bottleneck.

A mixin rather than a collaborator object: the loops read and write the role's server, view and per-step counters
(and the summary reports them), which the record and step parts use as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from swarm.training.balancing import StagePeer, choose_move
from swarm.training.node_role import Role
from swarm.training.stage_server import StaleStepError
from swarm.training.wiring import NoPeerError

if TYPE_CHECKING:
    from swarm.p2p.identity import PeerID
    from swarm.run.config import RunConfig
    from swarm.data import ShardedData
    from swarm.training.driver import Driver
    from swarm.training.stage_server import StageServer
    from swarm.training.training_config import TrainingConfig
    from swarm.training.verifying import NodeVerification
    from swarm.training.view import SwarmView

log = logging.getLogger(__name__)


class DrivingMixin:
    """Drives microbatches of this node's shard and moves the node to another stage when that helps."""

    cfg: TrainingConfig
    run_cfg: RunConfig
    me: PeerID
    rng: random.Random
    server: StageServer | None
    view: SwarmView
    data: ShardedData
    driver: Driver
    checks: NodeVerification
    my_samples: dict[int, int]
    inflight: dict[int, int]
    next_index: dict[int, int]
    losses: dict[int, list[float]]
    samples_driven: int
    first_sample_time: float | None
    finished_time: float | None
    _published: float
    _step_opened: float

    if TYPE_CHECKING:  # provided by `StepsMixin`, `RecordsMixin` and `TrainingRole`

        def _current_step(self) -> int: ...
        def step_samples(self, step: int) -> int: ...
        def _notify(self) -> None: ...
        async def _wait_change(self, timeout_s: float) -> None: ...
        async def refresh_view(self) -> None: ...
        async def publish_record(self) -> None: ...
        async def publish_progress(self, step: int) -> None: ...
        async def _publish_final_part(self, step: int, *, closed: bool = False) -> None: ...
        async def _send_step_hints(self, step: int) -> None: ...
        async def become(self, stage: int) -> None: ...
        def save_checkpoint(self) -> None: ...

    # ---- driving --------------------------------------------------------------------------------------------

    def _peers_of(self, stage: int) -> list[PeerID]:
        """Where this node's microbatches go for ``stage``: itself if it serves it, else the stage's peers less
        those caught by gradient checks (unless no other peer serves the stage)."""
        if self.server is not None and self.server.index == stage:
            return [self.me]
        peers = self.view.stage_peers(stage)
        offenders = self.checks.offenders()
        return [p for p in peers if p not in offenders] or peers

    def _may_start(self, step: int) -> bool:
        """Feed at most a fair share of the step (target / drivers), or what is left once others did theirs
        or the step has stalled for ``behind_grace_s`` (a driver left)."""
        target, micro = self.run_cfg.batch.target_batch_size, self.run_cfg.batch.microbatch_size
        mine = self.my_samples.get(step, 0) + self.inflight.get(step, 0)
        others = self.step_samples(step) - self.my_samples.get(step, 0)
        if mine + others >= target:
            return False
        drivers = sum(
            1 for r in self.view.peers.values() if r.role == Role.TRAINER or (r.role == Role.AUTO and r.stage == 0)
        )
        fair = -(-target // max(drivers, 1) // micro) * micro if drivers > 1 else target
        stalled = time.monotonic() - self._step_opened > self.cfg.behind_grace_s
        return mine < fair or others >= target - fair or stalled

    async def _drive_loop(self, worker: int) -> None:
        while True:
            serving_first = self.server is not None and self.server.index == 0
            if not (self.cfg.role == Role.TRAINER or (self.cfg.role == Role.AUTO and serving_first)):
                await asyncio.sleep(self.cfg.poll_interval_s)
                continue
            step = self._current_step()
            if self.first_sample_time is None and len(self.view.peers) < self.cfg.start_after_peers:
                await asyncio.sleep(self.cfg.poll_interval_s / 2)  # a start gate only: later departures don't stop us
                continue
            if not self._may_start(step) or (self.cfg.max_steps is not None and step >= self.cfg.max_steps):
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
            if (
                self.inflight.get(step, 0) == 0 and not self._may_start(step)
            ) or time.monotonic() - self._published > 1.0:
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
            peers = [
                StagePeer(
                    peer=p.to_base58(), stage=r.stage, throughput=r.throughput or self.cfg.balance.default_throughput
                )
                for p, r in self.view.peers.items()
                if r.stage is not None
            ]
            target = choose_move(peers, self.run_cfg.pipeline.num_stages, me=self.me.to_base58(), cfg=self.cfg.balance)
            if target is not None:
                log.info(
                    "%s: moving from stage %d to stage %d to raise the swarm's bottleneck",
                    self.me.short(),
                    server.index,
                    target,
                )
                await asyncio.to_thread(server.close_step)
                await asyncio.to_thread(self.save_checkpoint)
                self.server = None
                await self.become(target)
                await self.publish_record()
