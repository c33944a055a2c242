"""The training role's DHT records: the run's view, this node's records and step hints (`RunRecords`).

- view: read ``{run}/peers`` and ``{run}/progress`` (`refresh_view`) every ``view_interval_s``, and at once on a
  ``step.hint`` (`rpc_step_hint`);
- records: publish this node's `PeerRecord` and `RunConfigRecord` every ``record_period_s`` (expiry twice that),
  and a driver's `ProgressRecord` of a step (`publish_progress`, `publish_final_part`; with this node's latest
  validation loss, if it evaluates), telling the run's peers when a step looks complete (`send_step_hints`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from swarm.dht.keys import config_key, owner_subkey, peers_key, progress_key
from swarm.errors import SwarmError
from swarm.p2p import RpcContext
from swarm.p2p.identity import PeerID
from swarm.training.messages import PeerRecord, RunConfigRecord
from swarm.training.progress import ProgressRecord, StepHint, StepHintReply
from swarm.training.runloop import read_view
from swarm.training.state import TrainerState

log = logging.getLogger(__name__)

STEP_HINT_METHOD = "step.hint"


class RunRecords:
    """Reads the run's records into the state's view and publishes this node's."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state

    async def store(self, key: str, value: object, *, ttl_s: float, subkey: str | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` (a failure is logged, not raised: the next period retries)."""
        st = self.state
        try:
            async with asyncio.timeout(st.cfg.dht_timeout_s):
                await st.dht.store(key, value, time.time() + ttl_s, subkey=subkey)
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning("%s: could not store %s in the DHT: %s", st.me.short(), key, e)

    async def refresh_view(self) -> bool:
        """Read the run's peer and progress records into the view and learn the peers' addresses."""
        st = self.state
        view = await read_view(st.dht, st.transport, run_id=st.run_id, timeout_s=st.cfg.dht_timeout_s)
        if view is None:
            return False
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
        st.view.peers[st.me] = record
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

    async def publish_progress(self, step: int) -> None:
        """Publish this driver's `ProgressRecord` of ``step`` (its samples so far) under ``{run}/progress``."""
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
        st.published_samples = {step: record.samples}
        await self.store(
            progress_key(st.run_id),
            record.to_wire(),
            ttl_s=2 * st.cfg.record_period_s + 60,
            subkey=owner_subkey(st.me),
        )

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
        st.published = time.monotonic()
        await self.publish_progress(step)
        await self.send_step_hints(step)

    async def rpc_step_hint(self, ctx: RpcContext, req: StepHint) -> StepHintReply:
        """A driver says a step's samples look complete: re-read the records now instead of at the next poll."""
        if req.run_id == self.state.run_id and req.step >= self.state.current_step():
            self.state.refresh_now.set()
        return StepHintReply()

    async def send_step_hints(self, step: int) -> None:
        """Tell every peer of the run that ``step`` looks complete (each call bounded by a short deadline)."""
        st = self.state
        hint = StepHint(run_id=st.run_id, step=step)

        async def send(peer: PeerID) -> None:
            try:
                await st.transport.call(
                    peer, STEP_HINT_METHOD, hint, StepHintReply, timeout_s=st.cfg.poll_interval_s * 5
                )
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: step hint to %s failed: %s", st.me.short(), peer.short(), e)

        await asyncio.gather(*(send(p) for p, r in st.view.peers.items() if p != st.me and r.stage is not None))

    async def record_loop(self) -> None:
        """Forever: re-publish this node's `PeerRecord` every ``record_period_s`` (jittered)."""
        st = self.state
        while True:
            await asyncio.sleep(st.cfg.record_period_s * st.rng.uniform(0.8, 1.0))
            await self.publish_record()
