"""The training role's step machinery: when a step closes, averaging, catching up (`StepsMixin`).

Mixed into `swarm.training.trainer.TrainingRole`, whose state it shares (see the class body for what it reads). When the
samples of the stage server's step (this node's own plus the others' progress records) reach the target batch
size, `finish_step` closes it, averages the mean gradients with the stage's peers (weighted by samples), adds the
other stage's part of the tied matrix's gradient and applies the optimizer; `_catch_up` downloads the state of a
peer ahead (or jumps to the swarm's step when no peer of the stage is ahead); after averaging alone,
`_adopt_reference_state` loads a peer's next state so the replicas meet again. `_notify` / `_wait_change` wake the
role's loops when the view, a step or this node's progress changed.

A mixin rather than a collaborator object: these methods read and write the role's server, view, per-step counters
and sync flags, which the record and driving parts use as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from swarm.dht.keys import averaging_group_key
from swarm.errors import SwarmError
from swarm.training.tied import tied_index

if TYPE_CHECKING:
    import torch

    from swarm.p2p.identity import PeerID
    from swarm.averaging import Averager
    from swarm.run.config import RunConfig
    from swarm.training.stage_server import StageServer
    from swarm.training.tied import TiedService
    from swarm.training.training_config import TrainingConfig
    from swarm.training.verifying import NodeVerification
    from swarm.training.view import SwarmView
    from swarm.training.wiring import PeerSelector

log = logging.getLogger(__name__)


class StepsMixin:
    """Closes, averages and applies the stage server's steps and keeps it in step with the swarm."""

    cfg: TrainingConfig
    run_cfg: RunConfig
    run_id: str
    me: PeerID
    rng: random.Random
    server: StageServer | None
    view: SwarmView
    selectors: list[PeerSelector]
    checks: NodeVerification
    averager: Averager
    tied: TiedService
    my_samples: dict[int, int]
    needs_sync: bool
    _changed: asyncio.Event
    _behind_since: float | None
    _step_opened: float

    if TYPE_CHECKING:  # provided by `RecordsMixin` and `TrainingRole`

        async def publish_record(self) -> None: ...
        async def _publish_final_part(self, step: int, *, closed: bool = False) -> None: ...
        async def sync_from(self, peer: PeerID, server: StageServer) -> None: ...
        def save_checkpoint(self) -> None: ...

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
        """The samples of ``step`` done so far: the others' progress records plus this node's own count."""
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
        grads = self.checks.hooks.gradients_to_average(step, await asyncio.to_thread(server.mean_gradients))
        # offenders (caught here or by a quorum) are left out of this node's span; confirmed ones are not even
        # grouped with, while a suspect only this node caught still is, so that its other peers can confirm it
        offenders, confirmed = self.checks.offenders(), self.checks.confirmed_offenders()
        others = [p for p in self.view.stage_peers(server.index) if p != self.me and p not in confirmed]
        if others:
            result = await self.averager.step(
                grads,
                weight=max(float(server.samples), 1e-3),
                group_key=averaging_group_key(self.run_id, server.index, step),
                target_group_size=len(others) + 1,
                exclude=offenders,
                avoid=confirmed,
            )
            await self.checks.inspect(step, server.index, result.inspected)
            if not result.with_others:
                log.warning(
                    "%s: step %d of stage %d averaged alone (peers: %d); will adopt a peer's next state",
                    self.me.short(),
                    step,
                    server.index,
                    len(others),
                )
                self.needs_sync = True
        averaged = time.monotonic()
        retie: dict[int, torch.Tensor] = {}
        if tied_index(server) is not None:
            other = self.run_cfg.pipeline.num_stages - 1 if server.index == 0 else 0
            trusted = [p for p in self.view.stage_peers(other) if p not in offenders]
            retie = (await self.tied.combine(server, step, grads, self.rng.sample(trusted, len(trusted)))).replace
        tied_done = time.monotonic()
        if not (self.needs_sync and await self._adopt_reference_state(server, step + 1)):
            await asyncio.to_thread(server.apply_step, grads, replace=retie)
        self._notify()
        now = time.monotonic()
        elapsed, self._step_opened = now - self._step_opened, now
        log.info(
            "%s: stage %d step %d done (%d samples served in all; %.2fs: %.2fs feeding, %.3fs averaging, "
            "%.3fs tied, %.3fs optimizer)",
            self.me.short(),
            server.index,
            step,
            server.total_samples,
            elapsed,
            closed - (now - elapsed),
            averaged - closed,
            tied_done - averaged,
            now - tied_done,
        )
        if server.step % self.cfg.save_every_steps == 0:
            await asyncio.to_thread(self.save_checkpoint)
        await self.publish_record()

    async def _catch_up(self, server: StageServer) -> None:
        peer, newest = self.view.newest_step(server.index, exclude=self.checks.offenders())
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
            log.warning(
                "%s: stage %d is at step %d, the swarm at %d, and no peer of the stage is ahead; jumping",
                self.me.short(),
                server.index,
                server.step,
                self.swarm_step(),
            )
            await asyncio.to_thread(server.skip_to, self.swarm_step())
            self._behind_since = None
        elif ahead and peer is not None and (self.needs_sync or now - self._behind_since >= self.cfg.behind_grace_s):
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
            offenders = self.checks.offenders()  # never adopt the state of a peer caught cheating
            peers = sorted(
                (p for p in self.view.stage_peers(server.index) if p not in offenders), key=lambda p: p.to_bytes()
            )
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
        log.warning(
            "%s: no peer of stage %d reached step %d within %.1fs; applying own update",
            self.me.short(),
            server.index,
            next_step,
            self.cfg.behind_grace_s,
        )
        return False
