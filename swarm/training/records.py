"""The training role's DHT records: the run's view, this node's records and its step progress (`RunRecords`).

- view: read ``{run}/peers`` and ``{run}/progress`` (`refresh_view`, both at once) every ``view_interval_s``;
  progress records a peer told this node directly and that are newer than the DHT's copy are kept;
- progress: a driver tells its `ProgressRecord` straight to the run's other training peers when its part of the
  step is done, and at least every second (``step.hint`` carrying the record, over the connections they already
  have): a stage server learns that its step is complete half a round trip after the last microbatch, with no DHT
  round trip before it; the same record goes to ``{run}/progress`` (`publish_progress`, `publish_final_part`) for
  discovery and audit, as a background task the step never waits for;
- records: publish this node's `PeerRecord` and `RunConfigRecord` every ``record_period_s`` (expiry twice that), and
  at once, in the background, after each step (`publish_record_soon`).

Background work (`outbox_loop`) runs in the role's TaskGroup: cancelled when the role ends, each call bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from swarm.dht.keys import config_key, owner_subkey, peers_key, progress_key
from swarm.errors import SwarmError
from swarm.p2p import RpcContext
from swarm.p2p.identity import PeerID
from swarm.training.messages import PeerRecord, RunConfigRecord
from swarm.training.node_role import Role
from swarm.training.progress import ProgressRecord, StepHint, StepHintReply
from swarm.training.runloop import read_view
from swarm.training.state import TrainerState

log = logging.getLogger(__name__)

STEP_HINT_METHOD = "step.hint"


class RunRecords:
    """Reads the run's records into the state's view and publishes this node's."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state
        self._outbox: asyncio.TaskGroup | None = None  # while `outbox_loop` runs: where background work goes
        self._published: PeerRecord | None = None  # the peer record this node last published (in this life)

    async def outbox_loop(self) -> None:
        """Forever (in the role's TaskGroup): own the background stores and messages (`_later`) until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._outbox = tg
            try:
                await asyncio.Event().wait()
            finally:
                self._outbox = None

    async def _later(self, *coros: Coroutine[Any, Any, None]) -> None:
        """Run ``coros`` in the background when `outbox_loop` runs (each catches its own errors), else now."""
        if self._outbox is not None:
            for coro in coros:
                self._outbox.create_task(coro)
        else:
            await asyncio.gather(*coros)

    async def store(self, key: str, value: object, *, ttl_s: float, subkey: str | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` (a failure is logged, not raised: the next period retries)."""
        st = self.state
        try:
            async with asyncio.timeout(st.cfg.dht_timeout_s):
                await st.dht.store(key, value, time.time() + ttl_s, subkey=subkey)
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning("%s: could not store %s in the DHT: %s", st.me.short(), key, e)

    async def refresh_view(self) -> bool:
        """Read the run's peer and progress records into the view and learn the peers' addresses (progress records
        told directly and newer than the DHT's are kept, see `SwarmView.keep_newer_progress`)."""
        st = self.state
        view = await read_view(st.dht, st.transport, run_id=st.run_id, timeout_s=st.cfg.dht_timeout_s)
        if view is None:
            return False
        view.keep_newer_progress(st.view, now=time.time(), max_age_s=self.progress_ttl_s)
        if self._published is not None:  # its own record as it last published it: a read begun earlier is older
            view.peers[st.me] = self._published
        st.view = view
        st.notify()
        return True

    async def wait_refresh(self) -> None:
        """Wait ``view_interval_s``, or less when a step hint asks for a refresh now."""
        st = self.state
        try:
            async with asyncio.timeout(st.cfg.view_interval_s):
                await st.refresh_now.wait()
        except TimeoutError:
            pass
        st.refresh_now.clear()

    @property
    def progress_ttl_s(self) -> float:
        """How long a progress record lives (in the DHT, and in the view when told directly)."""
        return 2 * self.state.cfg.record_period_s + 60

    async def publish_record_soon(self) -> None:
        """`publish_record` in the background (after a step: nobody waits for the DHT store)."""
        await self._later(self.publish_record())

    async def publish_record(self) -> None:
        """Publish this node's `PeerRecord` (role, stage, addresses, throughput, step) under ``{run}/peers``."""
        st = self.state
        server = st.server
        record = PeerRecord(
            role=st.cfg.role,
            stage=server.index if server else None,
            maddrs=list(st.transport.advertised_maddrs),
            reachability=st.transport.reachability,
            throughput=server.throughput() if server else 0.0,
            step=server.step if server else st.current_step(),
            config_hash=st.run_cfg.config_hash(),
        )
        st.view.peers[st.me] = self._published = record
        await asyncio.gather(
            self.store(
                peers_key(st.run_id), record.to_wire(), ttl_s=2 * st.cfg.record_period_s, subkey=owner_subkey(st.me)
            ),
            self.publish_config(),
        )

    async def publish_config(self) -> None:
        """Publish this node's `RunConfigRecord` under ``runs/{name}/config`` (its owned subkey), expiring with its
        `PeerRecord`: the join check of nodes of the same run name counts it (`swarm.training.join_check`)."""
        st = self.state
        record = RunConfigRecord(hash=st.run_cfg.config_hash(), config=st.run_cfg.identity_dict())
        await self.store(
            config_key(st.run_cfg.name),
            record.to_wire(),
            ttl_s=2 * st.cfg.record_period_s,
            subkey=owner_subkey(st.me),
        )

    async def publish_progress(self, step: int, *, background: bool = False) -> None:
        """Tell this driver's `ProgressRecord` of ``step`` (its samples so far) to the run's training peers and
        publish it under ``{run}/progress``; with ``background``, without waiting for either."""
        st = self.state
        elapsed = max(time.monotonic() - st.started, 1e-6)
        losses = st.losses.get(step) or []
        record = ProgressRecord(
            step=step,
            samples=st.my_samples.get(step, 0),
            samples_per_s=st.samples_driven / elapsed,
            loss=sum(losses) / len(losses) if losses else None,
            time=time.time(),
            eval_step=max(st.eval_losses, default=None),
            eval_loss=st.eval_losses[max(st.eval_losses)] if st.eval_losses else None,
        )
        st.view.progress[st.me] = record
        st.published = time.monotonic()
        st.published_samples = {step: record.samples}
        work = [
            self.tell_progress(record),
            self.store(
                progress_key(st.run_id), record.to_wire(), ttl_s=self.progress_ttl_s, subkey=owner_subkey(st.me)
            ),
        ]
        if background:
            await self._later(*work)
        else:
            await asyncio.gather(*work)

    async def publish_eval(self) -> None:
        """Republish this driver's progress record (of the step it last published) with its latest validation loss."""
        st = self.state
        await self.publish_progress(next(iter(st.published_samples), st.current_step()))

    async def publish_final_part(self, step: int, *, closed: bool = False) -> None:
        """Publish this driver's samples of ``step`` unless already published (and, unless ``closed``, once no
        microbatch of it is in flight: after this node's own server closed the step none can count any more).

        A step can close while this driver's last part is unpublished (its other microbatch was still in flight);
        the stages that learn of the step's samples only from progress records would then wait for it forever.
        """
        st = self.state
        mine = st.my_samples.get(step, 0)
        if mine == 0 or (st.inflight.get(step, 0) and not closed) or st.published_samples.get(step) == mine:
            return
        await self.publish_progress(step, background=True)

    async def rpc_step_hint(self, ctx: RpcContext, req: StepHint) -> StepHintReply:
        """A driver tells its progress record (the caller is authenticated: it can only tell its own), which the
        view takes when newer than what it has; without a record, re-read the records now instead of at the next
        poll."""
        st = self.state
        if req.run_id != st.run_id:
            return StepHintReply()
        if req.progress is not None:
            if ctx.peer_id != st.me and st.view.take_progress(ctx.peer_id, req.progress):
                st.notify()
        elif req.step >= st.current_step():
            st.refresh_now.set()
        return StepHintReply()

    async def tell_progress(self, record: ProgressRecord) -> None:
        """Tell ``record`` to every training peer of the run (validators read the DHT; each call bounded by
        ``poll_interval_s * 5``; a failure only logs: the DHT copy and the view loop catch up)."""
        st = self.state
        hint = StepHint(run_id=st.run_id, step=record.step, progress=record)

        async def send(peer: PeerID) -> None:
            try:
                await st.transport.call(
                    peer, STEP_HINT_METHOD, hint, StepHintReply, timeout_s=st.cfg.poll_interval_s * 5
                )
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: progress to %s failed: %s", st.me.short(), peer.short(), e)

        peers = [p for p, r in st.view.peers.items() if p != st.me and r.role != Role.VALIDATOR]
        await asyncio.gather(*(send(p) for p in peers))

    async def record_loop(self) -> None:
        """Forever: re-publish this node's `PeerRecord` every ``record_period_s`` (jittered)."""
        st = self.state
        while True:
            await asyncio.sleep(st.cfg.record_period_s * st.rng.uniform(0.8, 1.0))
            await self.publish_record()
