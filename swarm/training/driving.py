"""The training role's drive workers (`Driving`).

Drivers are stage-0 nodes and trainers: each of ``inflight_microbatches`` workers pushes microbatches of this
node's shard through the pipeline (`swarm.training.driver.Driver`), feeding at most a fair share of the step, and
tells the run's peers its progress when its part is done (`RunRecords.publish_progress`, in the background).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from swarm.data import ShardedData
from swarm.p2p.identity import PeerID
from swarm.training.driver import Driver, StageClient
from swarm.training.records import RunRecords
from swarm.training.stage_server import StaleStepError
from swarm.training.state import TrainerState
from swarm.training.verifying import NodeVerification
from swarm.training.wiring import NoPeerError
from swarm.training.node_role import Role

log = logging.getLogger(__name__)


class Driving:
    """Drives microbatches of this node's shard (``data``) through the pipeline with ``client``."""

    def __init__(
        self,
        state: TrainerState,
        *,
        records: RunRecords,
        checks: NodeVerification,
        client: StageClient,
        data: ShardedData,
    ) -> None:
        self.state = state
        self.records = records
        self.checks = checks
        self.data = data
        self.driver = Driver(
            state.cfg.driver,
            num_stages=state.run_cfg.pipeline.num_stages,
            client=client,
            peers_of=self.peers_of,
            selectors=state.selectors,
            step_of=state.current_step,
            name=state.me.short(),
        )
        self.before_step: Callable[[int], Awaitable[None]] = _nothing  # `Evaluation.before_step` once built

    def peers_of(self, stage: int) -> list[PeerID]:
        """Where this node's microbatches go for ``stage``: itself if it serves it, else the stage's peers less
        those caught by gradient checks (unless no other peer serves the stage)."""
        st = self.state
        if st.server is not None and st.server.index == stage:
            return [st.me]
        peers = st.view.stage_peers(stage)
        offenders = self.checks.offenders()
        return [p for p in peers if p not in offenders] or peers

    def may_start(self, step: int) -> bool:
        """Feed at most a fair share of the step (target / drivers), or what is left once others did theirs
        or the step has stalled for ``behind_grace_s`` (a driver left)."""
        st = self.state
        target, micro = st.run_cfg.batch.target_batch_size, st.run_cfg.batch.microbatch_size
        mine = st.my_samples.get(step, 0) + st.inflight.get(step, 0)
        others = st.step_samples(step) - st.my_samples.get(step, 0)
        if mine + others >= target:
            return False
        drivers = len(st.view.drivers())
        fair = -(-target // max(drivers, 1) // micro) * micro if drivers > 1 else target
        stalled = time.monotonic() - st.step_opened > st.cfg.behind_grace_s
        return mine < fair or others >= target - fair or stalled

    async def drive_loop(self, worker: int) -> None:
        """Forever (one worker): drive the next microbatch of the current step while this node is a driver."""
        st = self.state
        while True:
            serving_first = st.server is not None and st.server.index == 0
            if not (st.cfg.role == Role.TRAINER or (st.cfg.role == Role.AUTO and serving_first)):
                await asyncio.sleep(st.cfg.poll_interval_s)
                continue
            step = st.current_step()
            if st.first_sample_time is None and len(st.view.peers) < st.cfg.start_after_peers:
                await asyncio.sleep(st.cfg.poll_interval_s / 2)  # a start gate only: later departures don't stop us
                continue
            await self.before_step(step)  # the validation loss of the step's weights, when due (evaluating.py)
            if not self.may_start(step) or (st.cfg.max_steps is not None and step >= st.cfg.max_steps):
                await st.wait_change(st.cfg.poll_interval_s / 2)
                continue
            await self._drive_one(step)

    async def _drive_one(self, step: int) -> None:
        """Drive the next microbatch of ``step``; count it and publish this driver's part when due."""
        st = self.state
        index = st.next_index.get(step, 0)
        st.next_index[step] = index + 1
        # counted in flight before the microbatch loads: the other workers' `may_start` must see it at once, or
        # every worker starts one while the first still loads and the driver feeds more than its share
        reserved = st.run_cfg.batch.microbatch_size
        st.inflight[step] = st.inflight.get(step, 0) + reserved
        try:
            mb = await asyncio.to_thread(self.data.microbatch, step, index)
            st.inflight[step] += mb.num_samples - reserved
            reserved = mb.num_samples
            if st.first_sample_time is None:
                st.first_sample_time = time.time()
            loss = await self.driver.run_microbatch(mb)
        except StaleStepError:
            loss = None
        except NoPeerError as e:
            missing = [s for s in range(st.run_cfg.pipeline.num_stages) if not self.peers_of(s)]
            log.warning("%s: %s; stages without a peer: %s; waiting", st.me.short(), e, missing or "none")
            await asyncio.sleep(1.0)
            return
        finally:
            st.inflight[step] -= reserved
        if loss is None:  # the step closed first: the others must still see this driver's whole part of it
            await self.records.publish_final_part(step)
            return
        st.my_samples[step] = st.my_samples.get(step, 0) + mb.num_samples
        st.samples_driven += mb.num_samples
        st.losses.setdefault(step, []).append(loss)
        st.notify()
        # when this driver's part of the step is done (each stage server closes the step when the samples reach the
        # target), else at most every second: tell the run's peers directly and store the record in the DHT, in the
        # background (nobody waits for the DHT before closing the step)
        if (st.inflight.get(step, 0) == 0 and not self.may_start(step)) or time.monotonic() - st.published > 1.0:
            await self.records.publish_progress(step, background=True)


async def _nothing(step: int) -> None:
    return None
