"""Real node processes restarted mid-run: from a checkpoint whose step was set to 100000, at once with a stale
checkpoint, and with a corrupt checkpoint. The swarm never jumps, the run ends at its max_steps, and the two
replicas of stage 0 end bit-identical (compared through their final checkpoints, saved at max_steps).

Three processes: two replicas of stage 0 (``a``, ``b``; they drive) and one of stage 1 (``c``), each with its stage
pinned. The test follows the run through the run's own DHT records (an observer node in the test process), not
through log text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from swarm.dht import DHT, DHTConfig
from swarm.local.events import EventReader, ListeningEvent, ServingEvent
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity, PeerID
from swarm.run.config import RunConfig
from swarm.training.checkpoint import load_state, save_state
from swarm.training.runloop import read_view
from swarm.training.schemas import with_run_schemas
from swarm.training.summary import NodeSummary
from tests.training.swarm_harness import small_run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

MAX_STEPS = 48  # long enough that the swarm is still mid-run when the restarted node is back (checked)
CLAIM_MAX_STEPS = 80
START_S = 60.0  # a process listens and serves within this (importing torch on a busy machine is slow)
RUN_S = 100.0  # the whole run, from the restart to max_steps


@dataclass
class NodeProcess:
    """One ``swarm-node start`` process (a life of a node: a restart is a new life with the same data dir)."""

    tmp: Path
    name: str
    stage: int
    config: Path
    bootstrap: str | None
    max_steps: int = MAX_STEPS
    life: int = 0
    proc: subprocess.Popen[str] | None = None
    peer_id: PeerID | None = None
    maddr: str = ""
    lives: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.tmp / self.name

    def checkpoint(self, run: RunConfig) -> Path:
        return self.data_dir / "checkpoints" / run.run_id / f"stage-{self.stage}.safetensors"

    def summary_path(self) -> Path:
        return self.tmp / f"{self.name}-{self.life}.summary.json"

    async def start(self) -> None:
        self.life += 1
        events = self.tmp / f"{self.name}-{self.life}.events.jsonl"
        args = [
            *(sys.executable, "-m", "swarm.cli.node", "start", "--data-dir", str(self.data_dir)),
            *("--config", str(self.config), "--stage", str(self.stage), "--max-steps", str(self.max_steps)),
            *("--summary-file", str(self.summary_path()), "--events-file", str(events), "--start-after-peers", "3"),
            *(("--initial-peers", self.bootstrap) if self.bootstrap else ()),
        ]
        with open(self.tmp / f"{self.name}-{self.life}.log", "w") as log:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, text=True, env=env)
        self.lives.append(self.proc)
        reader = EventReader(events)
        proc = self.proc
        async with asyncio.timeout(START_S):
            listening = await reader.wait_for(ListeningEvent, alive=lambda: proc.poll() is None)
            await reader.wait_for(ServingEvent, alive=lambda: proc.poll() is None)
        self.maddr = listening.maddrs[0]
        self.peer_id = PeerID.from_base58(self.maddr.rsplit("/p2p/", 1)[1])

    async def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        await asyncio.to_thread(self.proc.wait, 30)

    def summary(self) -> NodeSummary:
        return NodeSummary.read(self.summary_path())


@asynccontextmanager
async def observer(bootstrap: str) -> AsyncIterator[tuple[Transport, DHT]]:
    """A DHT node in the test process that reads the run's records (it serves no stage and publishes nothing)."""
    transport = Transport(
        Identity.from_seed(b"\x42" * 32), TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=5.0)
    )
    await transport.start()
    dht = DHT.create(
        with_run_schemas(DHTConfig(initial_peers=(bootstrap,))), identity=transport.identity, transport=transport
    )
    try:
        await dht.start()
        yield transport, dht
    finally:
        await dht.shutdown()
        await transport.stop()


async def wait_record_step(transport: Transport, dht: DHT, run: RunConfig, peer: PeerID, step: int) -> int:
    """Wait until ``peer``'s record in the run says ``step`` or later; returns that step."""
    async with asyncio.timeout(RUN_S):
        while True:
            view = await read_view(dht, transport, run_id=run.run_id, timeout_s=5.0)
            record = view.peers.get(peer) if view is not None else None
            if record is not None and record.step >= step:
                return record.step
            await asyncio.sleep(0.5)


async def wait_exit(nodes: list[NodeProcess]) -> list[int]:
    async with asyncio.timeout(RUN_S):
        return [await asyncio.to_thread(n.proc.wait) for n in nodes if n.proc is not None]


def parameters(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = load_state(path)
    return state.step, {k: v for k, v in state.tensors.items() if k.startswith("param.")}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@asynccontextmanager
async def three_nodes(tmp_path: Path, max_steps: int = MAX_STEPS) -> AsyncIterator[tuple[RunConfig, list[NodeProcess]]]:
    run = small_run()
    config = tmp_path / "run.toml"
    config.write_text(run.to_toml())
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp=tmp_path, name="a", stage=0, config=config, bootstrap=None, max_steps=max_steps)
        nodes.append(a)
        await a.start()
        for name, stage in (("b", 0), ("c", 1)):
            node = NodeProcess(
                tmp=tmp_path, name=name, stage=stage, config=config, bootstrap=a.maddr, max_steps=max_steps
            )
            nodes.append(node)
            await nodes[-1].start()
        yield run, nodes
    finally:
        for proc in (p for n in nodes for p in n.lives):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (p for n in nodes for p in n.lives):
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def test_a_checkpoint_claiming_step_100000_does_not_move_the_swarm(tmp_path: Path) -> None:
    """b stops cleanly, its checkpoint's step is set to 100000 (the weights are valid), and it restarts: it does
    not believe its checkpoint, nobody jumps, and every node ends at max_steps."""
    async with three_nodes(tmp_path, CLAIM_MAX_STEPS) as (run, (a, b, c)):
        async with observer(a.maddr) as (transport, dht):
            assert a.peer_id is not None and b.peer_id is not None
            await wait_record_step(transport, dht, run, b.peer_id, 3)
            await b.stop(signal.SIGTERM)
            state = load_state(b.checkpoint(run))
            save_state(b.checkpoint(run), dataclasses.replace(state, step=100_000))
            await b.start()
            assert await wait_record_step(transport, dht, run, a.peer_id, 0) < CLAIM_MAX_STEPS - 5  # mid-run
        assert await wait_exit([a, b, c]) == [0, 0, 0]
        assert [n.summary().step for n in (a, b, c)] == [CLAIM_MAX_STEPS] * 3


@pytest.mark.parametrize("corrupt", [False, True], ids=["stale-checkpoint", "corrupt-checkpoint"])
async def test_a_restarted_stage_0_replica_ends_bit_identical(tmp_path: Path, corrupt: bool) -> None:
    """b is SIGKILLed once it has a checkpoint and restarted at once with its stage pinned (its record still in
    the DHT), from that stale checkpoint or from a corrupt one: it takes a's state, and both replicas end
    bit-identical at max_steps."""
    async with three_nodes(tmp_path) as (run, (a, b, c)):
        async with observer(a.maddr) as (transport, dht):
            assert a.peer_id is not None and b.peer_id is not None
            await wait_record_step(transport, dht, run, b.peer_id, 6)  # a checkpoint of step 5 exists
            await b.stop(signal.SIGKILL)
            if corrupt:
                b.checkpoint(run).write_bytes(b"\x00garbage" * 64)
            await b.start()
            assert await wait_record_step(transport, dht, run, a.peer_id, 0) < MAX_STEPS - 5  # mid-run
        assert await wait_exit([a, b, c]) == [0, 0, 0]
        (step_a, weights_a), (step_b, weights_b) = parameters(a.checkpoint(run)), parameters(b.checkpoint(run))
        assert step_a == step_b == MAX_STEPS
        assert max_difference(weights_a, weights_b) == 0.0
