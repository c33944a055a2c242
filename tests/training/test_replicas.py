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
from swarm.training.node_role import Role
from swarm.training.progress import ProgressRecord
from swarm.training.replicas import MAX_DIVERGED_STEPS, ReplicaDivergedError
from swarm.training.schemas import with_run_schemas
from swarm.verification.outliers import fetch_reports, reported_peers
from tests.training.swarm_harness import LiveNode, Swarm, small_run, stage_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FAKE_STEP = 100_000


def step_of(node: LiveNode) -> int:
    server = node.role.server
    assert server is not None
    return server.step


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
        assert swarm.bootstrap is not None
        config = with_run_schemas(DHTConfig(initial_peers=(swarm.bootstrap,)))
        dht = DHT.create(config, identity=liar, transport=transport)
        await dht.start()
        expires = time.time() + 200
        claim = PeerRecord(role=Role.AUTO, stage=1, maddrs=[], throughput=50.0, step=FAKE_STEP, config_hash="x")
        done = ProgressRecord(step=FAKE_STEP, samples=run.batch.target_batch_size, samples_per_s=9.0, time=time.time())
        assert await dht.store(peers_key(run.run_id), claim.to_wire(), expires, subkey=owner_subkey(liar.peer_id))
        assert await dht.store(progress_key(run.run_id), done.to_wire(), expires, subkey=owner_subkey(liar.peer_id))
        await finish(nodes)
        assert [step_of(n) for n in nodes] == [8, 8, 8]
        for node in nodes:
            assert liar.peer_id in node.role.view.peers  # the claim was seen ...
            assert liar.peer_id in node.trainer.checks.offenders()  # ... not believed, and an offender here
        # ... and reported like any cheater: signed outlier reports of enough distinct peers flag it
        settings = run.verification
        flagged = [
            reported_peers(await fetch_reports(dht, run.run_id, window), settings.outlier_min_reporters)
            for window in range(8 // settings.window_steps + 1)
        ]
        reasons = [found[liar.peer_id] for found in flagged if liar.peer_id in found]
        assert reasons and "claimed step 100000" in reasons[0]
    finally:
        await swarm.close()
        if dht is not None:
            await dht.shutdown()
        await transport.stop()


async def snapshot_steps(node: LiveNode, into: dict[int, list[torch.Tensor]]) -> None:
    """Forever: keep ``node``'s weights of each step it reaches (weights change only together with the step, under
    the server's lock, so a step and the weights read together are consistent)."""
    while True:
        server = node.role.server
        if server is not None:
            with server.lock:
                if server.step not in into:
                    into[server.step] = [p.detach().clone() for p in server.model.parameters()]
        await asyncio.sleep(0.005)


async def _restart_scenario(tmp_path: Path, *, corrupt: bool) -> None:
    """Three nodes (two replicas of stage 0, one of stage 1). One stage-0 replica is killed between checkpoints,
    right after publishing its record, and restarted at once with the same identity and its stage pinned, from its
    stale (or a corrupt) checkpoint, while its previous life's record (same step as its peer's, listed first with
    these identities) is still in the DHT. Its weights on rejoining must be its peer's weights of that step, and
    both replicas must be bit-identical at max_steps."""
    swarm = Swarm(small_run())
    max_steps = 12
    slow_records = dict(record_period_s=5.0)  # records outlive a restart (they live two periods), as in a real run
    keep: dict[str, object] = dict(
        stage=0, max_steps=max_steps, checkpoint_dir=tmp_path / "a", save_every_steps=3, **slow_records
    )
    peer_steps: dict[int, list[torch.Tensor]] = {}
    watcher: asyncio.Task[None] | None = None
    try:
        a = await swarm.add(seed=91, **keep)  # type: ignore[arg-type]
        # b waits long for a's share of a step, so that a's old record (a driver's) is at b's step when a rejoins
        b = await swarm.add(seed=90, stage=0, max_steps=max_steps, behind_grace_s=10.0, **slow_records)
        c = await swarm.add(seed=92, stage=1, max_steps=max_steps, **slow_records)
        watcher = asyncio.create_task(snapshot_steps(b, peer_steps))

        def published_off_checkpoint() -> bool:
            mine = a.role.view.peers.get(a.transport.peer_id)
            step = step_of(a)
            return step >= 4 and step % 3 != 0 and mine is not None and mine.step == step

        await wait_for(published_off_checkpoint, 60, "a step between checkpoints, published")
        await asyncio.sleep(0.2)  # the record's store lands
        await a.kill()
        swarm.bootstrap = b.transport.listen_maddrs[0]  # the first node's address died with it
        checkpoint = tmp_path / "a" / "stage-0.safetensors"
        assert checkpoint.exists()
        if corrupt:
            checkpoint.write_bytes(b"\x00garbage" * 64)
        again = await swarm.add(seed=91, **keep)  # type: ignore[arg-type]
        server = again.role.server
        assert server is not None
        with server.lock:
            rejoined_at, weights = server.step, [p.detach().clone() for p in server.model.parameters()]
        await wait_for(lambda: rejoined_at in peer_steps, 30, "the peer's snapshot of the rejoin step")
        assert all(torch.equal(p, q) for p, q in zip(weights, peer_steps[rejoined_at], strict=True))
        await finish([again, b, c])
        assert step_of(again) == step_of(b) == max_steps
        assert max_difference(again, b) == 0.0
    finally:
        if watcher is not None:
            watcher.cancel()
        await swarm.close()


@pytest.mark.parametrize("corrupt", [False, True], ids=["stale-checkpoint", "corrupt-checkpoint"])
async def test_an_instantly_restarted_replica_takes_its_peers_state(tmp_path: Path, corrupt: bool) -> None:
    await _restart_scenario(tmp_path, corrupt=corrupt)


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
        assert all(step_of(n) == 8 for n in stage0)
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
        step = max(step_of(n) for n in majority)
        await swarm.wait_step([*majority, last], step + 1, timeout_s=60)  # the others go on without it
    finally:
        await swarm.close()
