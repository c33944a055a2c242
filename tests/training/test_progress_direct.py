"""Step progress told directly to the run's peers (``step.hint`` with a record): no DHT round trip before a step
closes; the DHT copy is for discovery and audit, and the view keeps a told record newer than the DHT's."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from swarm.dht import DHT
from swarm.dht.keys import owner_subkey, progress_key
from swarm.dht.records import ValueWithExpiration
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.run.config import RunConfig
from swarm.training.progress import ProgressRecord, StepHint, StepHintReply
from swarm.training.records import STEP_HINT_METHOD, RunRecords
from swarm.training.state import TrainerState
from swarm.training.trainer import TrainingConfig
from swarm.training.view import SwarmView
from swarm.training.wiring import PeerSelector
from tests.training.swarm_harness import Swarm, small_run


def _record(step: int, samples: int, at: float) -> ProgressRecord:
    return ProgressRecord(step=step, samples=samples, samples_per_s=1.0, time=at)


def test_the_view_keeps_a_told_record_newer_than_the_dhts_and_drops_stale_ones() -> None:
    a, b, c = (Identity.from_seed(bytes([i]) * 32).peer_id for i in (1, 2, 3))
    before = SwarmView(progress={a: _record(4, 64, 100.0), b: _record(3, 32, 50.0), c: _record(1, 16, 10.0)})
    read = SwarmView.parse(
        None,
        {
            owner_subkey(a): ValueWithExpiration(_record(4, 32, 90.0).to_wire(), 1e12),  # older than the told one
            owner_subkey(b): ValueWithExpiration(_record(4, 16, 60.0).to_wire(), 1e12),  # newer
        },
    )
    read.keep_newer_progress(before, now=120.0, max_age_s=100.0)
    assert read.progress[a].samples == 64 and read.progress[b].step == 4
    assert c not in read.progress  # told 110 s ago: past its lifetime, as its DHT copy would be
    assert not read.take_progress(a, _record(4, 96, 99.0))  # an older record never replaces a newer one


async def test_a_told_record_is_taken_as_the_callers_own() -> None:
    run = RunConfig.from_toml()
    cfg = TrainingConfig(run=run, dht_timeout_s=3.0, rpc_timeout_s=3.0)
    transports = [
        Transport(Identity.from_seed(bytes([40 + i]) * 32), TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",)))
        for i in range(2)
    ]
    receiver, caller = transports
    for t in transports:
        await t.start()
    try:
        selectors: list[PeerSelector[Any]] = [PeerSelector(cfg.wiring, rng=random.Random(i)) for i in range(2)]
        state = TrainerState(cfg=cfg, transport=receiver, dht=None, rng=random.Random(0), selectors=selectors)
        records = RunRecords(state)
        receiver.register(STEP_HINT_METHOD, StepHint, records.rpc_step_hint)
        changed = state.changed
        hint = StepHint(run_id=run.run_id, step=2, progress=_record(2, 48, 1000.0))
        async with asyncio.timeout(10):
            await caller.call(receiver.listen_maddrs[0], STEP_HINT_METHOD, hint, StepHintReply)
            assert changed.is_set()  # the step loop wakes at once
            assert state.view.progress == {caller.peer_id: hint.progress}
            assert state.step_samples(2) == 48
            older = StepHint(run_id=run.run_id, step=2, progress=_record(2, 16, 999.0))
            foreign = StepHint(run_id="another-run", step=2, progress=_record(2, 64, 1001.0))
            for stale in (older, foreign):
                await caller.call(receiver.listen_maddrs[0], STEP_HINT_METHOD, stale, StepHintReply)
        assert state.step_samples(2) == 48
    finally:
        for t in transports:
            await t.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_steps_close_while_every_progress_store_in_the_dht_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    """One driver (stage 0) and one stage-1 server, whose only news of the step's samples is the driver's progress:
    with every store of ``{run}/progress`` hanging, steps still close (before: the stage-1 server never saw the
    samples, and the driver waited ``dht_timeout_s`` on each store)."""
    run = small_run()
    hung = asyncio.Event()
    real_store = DHT.store

    async def store(self: DHT, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if key == progress_key(run.run_id):
            hung.set()
            await asyncio.Event().wait()  # never: cancelled when the role ends
        return await real_store(self, key, value, expiration_time, subkey=subkey)

    monkeypatch.setattr(DHT, "store", store)
    swarm = Swarm(run)
    try:
        nodes = [await swarm.add(seed=50 + i, stage=i, start_after_peers=2, dht_timeout_s=30.0) for i in range(2)]
        await swarm.wait_step(nodes, 3, timeout_s=90)
        assert hung.is_set()
        assert all(n.role.server is not None and n.role.server.step >= 3 for n in nodes)
    finally:
        await swarm.close()
