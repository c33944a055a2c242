"""The training role's rebalancing (`Rebalancer`): at randomized intervals, move to another stage when that
clearly raises the swarm's bottleneck (`swarm.training.balancing.choose_move`). A stage left empty is checked
soon, with jitter so that its former peers' neighbours don't all move at once."""

from __future__ import annotations

import asyncio
import logging
import time

from swarm.training.balancing import StagePeer, choose_move
from swarm.training.records import RunRecords
from swarm.training.state import TrainerState
from swarm.training.sync import StateSync

log = logging.getLogger(__name__)


class Rebalancer:
    """Moves the node to the stage where it raises the swarm's bottleneck most, when that clearly helps."""

    def __init__(self, state: TrainerState, *, records: RunRecords, sync: StateSync) -> None:
        self.state = state
        self.records = records
        self.sync = sync

    async def rebalance_loop(self) -> None:
        """Forever: wait a jittered ``rebalance_interval_s`` (less with a stage left empty), then maybe move."""
        st = self.state
        while True:
            await self._wait_due()
            await self.records.refresh_view()
            if st.server is None or st.finished_time is not None:
                continue
            await self.maybe_move()

    async def _wait_due(self) -> None:
        st = self.state
        stages = range(st.run_cfg.pipeline.num_stages)
        due = time.monotonic() + st.cfg.rebalance_interval_s * st.rng.uniform(0.5, 1.5)
        while time.monotonic() < due:  # a stage left empty is checked soon, with jitter so peers don't all move
            await asyncio.sleep(st.cfg.poll_interval_s)
            if any(not st.view.stage_peers(s) for s in stages):
                due = min(due, time.monotonic() + st.cfg.poll_interval_s * 10 * st.rng.uniform(0.5, 1.5))

    async def maybe_move(self) -> None:
        """Move to the stage `choose_move` picks (if any): close and save the served stage, then serve the other."""
        st = self.state
        server = st.server
        if server is None:
            return
        default = st.cfg.balance.default_throughput
        peers = [
            StagePeer(peer=p.to_base58(), stage=r.stage, throughput=r.throughput or default, relayed=r.relayed)
            for p, r in st.view.peers.items()
            if r.stage is not None
        ]
        target = choose_move(peers, st.run_cfg.pipeline.num_stages, me=st.me.to_base58(), cfg=st.cfg.balance)
        if target is None:
            return
        log.info(
            "%s: moving from stage %d to stage %d to raise the swarm's bottleneck", st.me.short(), server.index, target
        )
        await asyncio.to_thread(server.close_step)
        await asyncio.to_thread(self.sync.save_checkpoint)
        st.server = None
        await self.sync.become(target)
        await self.records.publish_record()
