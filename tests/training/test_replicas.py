"""Step claims and replica consistency in in-process swarms (the real training role, transport and DHT).

- a peer claiming step 100000 in signed records moves nobody, and every node reports it;
- a stage-0 node restarted at once (its previous life's record still in the DHT), from a stale or a corrupt
  checkpoint, takes its stage peer's state: both replicas are bit-identical when the run ends;
- a replica whose weights differ from the majority downloads theirs; one that cannot stops serving and says why.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from swarm.dht import DHT, DHTConfig
from swarm.dht.keys import owner_subkey, peers_key, progress_key
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.training.messages import PeerRecord
from swarm.training.progress import ProgressRecord
from swarm.training.replicas import MAX_DIVERGED_STEPS, ReplicaDivergedError
from swarm.training.schemas import with_run_schemas
from tests.training.swarm_harness import LiveNode, Swarm, small_run, stage_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FAKE_STEP = 100_000


def max_difference(a: LiveNode, b: LiveNode) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(stage_weights(a), stage_weights(b), strict=True))


async def wait_for(condition: object, timeout_s: float, what: str) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def finish(nodes: list[LiveNode], timeout_s: float = 90.0) -> None:
    async with asyncio.timeout(timeout_s):
        await asyncio.gather(*(n.task for n in nodes))


async def test_a_fake_step_claim_moves_nobody_and_is_reported() -> None:
    """A peer with a valid identity publishes signed records of step 100000 (a stage record and a progress record
    that says the step's batch is complete): the swarm ends at its max_steps, and every node reports the peer."""
    run = small_run()
    swarm = Swarm(run)
    liar = Identity.from_seed(b"\x99" * 32)
    transport = Transport(liar, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=3.0))
    dht: DHT | None = None
    try:
        nodes = [
            await swarm.add(seed=80, stage=0, max_steps=8),
            await swarm.add(seed=81, stage=1, max_steps=8),
            await swarm.add(seed=82, stage=1, max_steps=8),
        ]
        await swarm.wait_step(nodes, 2, timeout_s=60)
        await transport.start()
        dht = DHT.create(with_run_schemas(DHTConfig(initial_peers=(swarm.bootstrap,))), identity=liar, transport=transport)
        await dht.start()
        expires = time.time() + 200
        claim = PeerRecord(role="auto", stage=1, maddrs=[], throughput=50.0, step=FAKE_STEP, config_hash="x")
        done = ProgressRecord(step=FAKE_STEP, samples=run.batch.target_batch_size, samples_per_s=9.0, time=time.time())
        assert await dht.store(peers_key(run.run_id), claim.to_wire(), expires, subkey=owner_subkey(liar.peer_id))
        assert await dht.store(progress_key(run.run_id), done.to_wire(), expires, subkey=owner_subkey(liar.peer_id))
        await finish(nodes)
        assert [n.role.server.step for n in nodes] == [8, 8, 8]
        for node in nodes:
            assert liar.peer_id in node.role.view.peers  # the claim was seen ...
            assert liar.peer_id in node.trainer.checks.offenders()  # ... not believed, and reported
    finally:
        await swarm.close()
        if dht is not None:
            await dht.shutdown()
        await transport.stop()


async def _restart_scenario(tmp_path: Path, *, corrupt: bool) -> tuple[float, int]:
    """Three nodes (two replicas of stage 0, one of stage 1); one stage-0 replica is killed between checkpoints
    and restarted at once with the same identity (its record still in the DHT) and its stage pinned, from its
    stale (or a corrupt) checkpoint. Returns the replicas' max parameter difference at max_steps, and the
    restarted node's step on rejoining."""
    swarm = Swarm(small_run())
    max_steps = 12
    keep = dict(stage=0, max_steps=max_steps, checkpoint_dir=tmp_path / "a", save_every_steps=3)
    try:
        a = await swarm.add(seed=90, **keep)  # type: ignore[arg-type]
        b = await swarm.add(seed=91, stage=0, max_steps=max_steps)
        c = await swarm.add(seed=92, stage=1, max_steps=max_steps)
        await wait_for(lambda: a.role.server.step >= 4 and a.role.server.step % 3 != 0, 60, "a step off checkpoint")
        await a.kill()
        swarm.bootstrap = b.transport.listen_maddrs[0]  # the first node's address died with it
        checkpoint = tmp_path / "a" / "stage-0.safetensors"
        assert checkpoint.exists()
        if corrupt:
            checkpoint.write_bytes(b"\x00garbage" * 64)
        again = await swarm.add(seed=90, **keep)  # type: ignore[arg-type]
        rejoined_at = again.role.server.step
        await finish([again, b, c])
        assert again.role.server.step == b.role.server.step == max_steps
        return max_difference(again, b), rejoined_at
    finally:
        await swarm.close()


@pytest.mark.parametrize("corrupt", [False, True], ids=["stale-checkpoint", "corrupt-checkpoint"])
async def test_an_instantly_restarted_replica_takes_its_peers_state(tmp_path: Path, corrupt: bool) -> None:
    difference, rejoined_at = await _restart_scenario(tmp_path, corrupt=corrupt)
    assert rejoined_at >= 4  # the peer's state, not its own stale checkpoint (a step divisible by 3) or step 0
    assert difference == 0.0


async def test_a_replica_off_the_majority_downloads_its_state() -> None:
    """Three replicas of stage 0; one's weights are nudged. At the next step its digest loses the vote and it
    downloads a majority member's state: all three are bit-identical at max_steps, and only it reloaded."""
    swarm = Swarm(small_run())
    try:
        stage0 = [await swarm.add(seed=100 + i, stage=0, max_steps=8) for i in range(3)]
        last = await swarm.add(seed=103, stage=1, max_steps=8)
        await swarm.wait_step([*stage0, last], 2, timeout_s=60)
        odd = stage0[0]
        server = odd.role.server
        assert server is not None
        with server.lock, torch.no_grad():
            next(server.model.parameters()).add_(1e-3)
        await finish([*stage0, last])
        assert all(n.role.server.step == 8 for n in stage0)
        assert max_difference(stage0[0], stage0[1]) == 0.0 and max_difference(stage0[1], stage0[2]) == 0.0
        assert odd.role.state_age_steps < 6 and all(n.role.state_age_steps == 8 for n in stage0[1:])
    finally:
        await swarm.close()


async def test_a_replica_that_cannot_be_reconciled_stops_serving() -> None:
    """As above, but the majority refuses state downloads: after MAX_DIVERGED_STEPS steps off the majority the
    odd replica leaves the stage's records and its role ends with ReplicaDivergedError."""
    swarm = Swarm(small_run())
    try:
        stage0 = [await swarm.add(seed=110 + i, stage=0) for i in range(3)]
        last = await swarm.add(seed=113, stage=1)
        await swarm.wait_step([*stage0, last], 2, timeout_s=60)
        odd, majority = stage0[0], stage0[1:]
        for node in majority:
            node.transport.unregister("state.download")
        server = odd.role.server
        assert server is not None
        with server.lock, torch.no_grad():
            next(server.model.parameters()).add_(1e-3)
        async with asyncio.timeout(60):
            await asyncio.gather(odd.task, return_exceptions=True)
        error = odd.task.exception()
        assert isinstance(error, ReplicaDivergedError) and "differed from the majority" in str(error)
        assert odd.role.server is None and odd.role.diverged_steps == MAX_DIVERGED_STEPS
        record = odd.role.view.peers[odd.transport.peer_id]
        assert record.stage is None  # it left the stage's records
        step = max(n.role.server.step for n in majority)
        await swarm.wait_step([*majority, last], step + 1, timeout_s=60)  # the others go on without it
    finally:
        await swarm.close()
