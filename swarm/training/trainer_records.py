"""The training role's DHT records: the run's view, this node's records and step hints (`RecordsMixin`).

Mixed into `swarm.training.trainer.TrainingRole`, whose state it shares (see the class body for what it reads):

- view: read ``{run}/peers`` and ``{run}/progress`` (`refresh_view`) every ``view_interval_s``, and at once on a
  ``step.hint`` (`rpc_step_hint`);
- records: publish this node's `PeerRecord` every ``record_period_s`` (expiry twice that), and a driver's
  `ProgressRecord` of a step (`publish_progress`, `_publish_final_part`), telling the run's peers when a step looks
  complete (`_send_step_hints`).

A mixin rather than a collaborator object: these methods read and write the role's view, server and per-step
counters, which the step and driving parts use as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from swarm.p2p.maddr import parse_maddr
from swarm.dht.keys import owner_subkey, peers_key, progress_key
from swarm.errors import AddressError, SwarmError
from swarm.training.messages import PeerRecord
from swarm.training.progress import ProgressRecord, StepHint, StepHintReply
from swarm.training.view import SwarmView

if TYPE_CHECKING:
    from swarm.dht import DHT
    from swarm.p2p.identity import PeerID
    from swarm.p2p import RpcContext, Transport
    from swarm.run.config import RunConfig
    from swarm.training.stage_server import StageServer
    from swarm.training.training_config import TrainingConfig

log = logging.getLogger(__name__)


class RecordsMixin:
    """Reads the run's records into ``view`` and publishes this node's; part of `TrainingRole`."""

    cfg: TrainingConfig
    run_cfg: RunConfig
    run_id: str
    transport: Transport
    dht: DHT
    me: PeerID
    rng: random.Random
    server: StageServer | None
    view: SwarmView
    started: float
    samples_driven: int
    my_samples: dict[int, int]
    inflight: dict[int, int]
    losses: dict[int, list[float]]
    _refresh_now: asyncio.Event
    _published: float
    _published_samples: dict[int, int]

    if TYPE_CHECKING:  # provided by `StepsMixin`

        def _notify(self) -> None: ...
        def _current_step(self) -> int: ...

    async def _store(self, key: str, value: object, *, ttl_s: float, subkey: str | None = None) -> None:
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                await self.dht.store(key, value, time.time() + ttl_s, subkey=subkey)
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning("%s: could not store %s in the DHT: %s", self.me.short(), key, e)

    async def refresh_view(self) -> None:
        """Read the run's peer and progress records into ``view`` and learn the peers' addresses."""
        try:
            async with asyncio.timeout(self.cfg.dht_timeout_s):
                peers = await self.dht.get(peers_key(self.run_id), latest=True)
                progress = await self.dht.get(progress_key(self.run_id), latest=True)
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
        """Publish this node's `PeerRecord` (role, stage, addresses, throughput, step) under ``{run}/peers``."""
        server = self.server
        record = PeerRecord(
            role=self.cfg.role,
            stage=server.index if server else None,
            maddrs=list(self.transport.listen_maddrs),
            throughput=server.throughput() if server else 0.0,
            step=server.step if server else self._current_step(),
            config_hash=self.run_cfg.config_hash(),
        )
        self.view.peers[self.me] = record
        await self._store(
            peers_key(self.run_id), record.to_wire(), ttl_s=2 * self.cfg.record_period_s, subkey=owner_subkey(self.me)
        )

    async def publish_progress(self, step: int) -> None:
        """Publish this driver's `ProgressRecord` of ``step`` (its samples so far) under ``{run}/progress``."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        losses = self.losses.get(step) or []
        record = ProgressRecord(
            step=step,
            samples=self.my_samples.get(step, 0),
            samples_per_s=self.samples_driven / elapsed,
            loss=sum(losses) / len(losses) if losses else None,
            time=time.time(),
        )
        self.view.progress[self.me] = record
        self._published_samples = {step: record.samples}
        await self._store(
            progress_key(self.run_id),
            record.to_wire(),
            ttl_s=2 * self.cfg.record_period_s + 60,
            subkey=owner_subkey(self.me),
        )

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
                await self.transport.call(
                    peer, "step.hint", hint, StepHintReply, timeout_s=self.cfg.poll_interval_s * 5
                )
            except (SwarmError, TimeoutError, OSError) as e:
                log.debug("%s: step hint to %s failed: %s", self.me.short(), peer.short(), e)

        await asyncio.gather(*(send(p) for p, r in self.view.peers.items() if p != self.me and r.stage is not None))

    async def _record_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.record_period_s * self.rng.uniform(0.8, 1.0))
            await self.publish_record()
