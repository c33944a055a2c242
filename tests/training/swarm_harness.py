"""In-process swarms for the training tests: N nodes (transport + DHT + TrainingRole) in one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import torch

from swarm.dht import DHT, DHTConfig
from swarm.p2p.identity import Identity
from swarm.p2p import Transport, TransportConfig
from swarm.run.config import RunConfig
from swarm.training.schemas import with_run_schemas
from swarm.training.hooks import HONEST, NodeHooks
from swarm.training.state import TrainerState
from swarm.training.trainer import TrainingConfig, TrainingRole, build_training_role

FAST = dict(
    record_period_s=1.0,
    poll_interval_s=0.1,
    view_interval_s=0.1,
    behind_grace_s=1.0,
    matchmaking_time_s=2.0,
    rpc_timeout_s=3.0,
    dht_timeout_s=3.0,
    rebalance_interval_s=0,
)


@dataclass
class LiveNode:
    transport: Transport
    dht: DHT
    trainer: TrainingRole
    task: asyncio.Task[None]
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def role(self) -> TrainerState:
        """The role's shared state (its stage server, losses, view)."""
        return self.trainer.state

    async def kill(self) -> None:
        """Vanish without a goodbye: cancel everything, drop every connection (like SIGKILL)."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.dht.shutdown()
        await self.transport.stop()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(self.task, return_exceptions=True)
        self.trainer.stop()
        await self.dht.shutdown()
        await self.transport.stop()


class Swarm:
    """Start nodes one after another (each reports its stage before the next starts); stop them all."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.nodes: list[LiveNode] = []
        self.bootstrap: str | None = None

    async def add(
        self, *, seed: int, timeout_s: float = 30.0, hooks: NodeHooks = HONEST, **overrides: object
    ) -> LiveNode:
        identity = Identity.from_seed(bytes([seed + 1]) * 32)
        transport = Transport(identity, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=3.0))
        await transport.start()
        dht = DHT.create(  # the run's record schemas, as swarm.node installs them
            with_run_schemas(DHTConfig(initial_peers=(self.bootstrap,) if self.bootstrap else ())),
            identity=identity,
            transport=transport,
        )
        await dht.start()
        if self.bootstrap is None:
            self.bootstrap = transport.listen_maddrs[0]
        cfg = TrainingConfig(run=self.run, seed=seed, **{**FAST, **overrides})  # type: ignore[arg-type]
        serving = asyncio.Event()
        role = build_training_role(cfg, transport=transport, dht=dht, on_serving=lambda _s: serving.set(), hooks=hooks)
        node = LiveNode(transport=transport, dht=dht, trainer=role, task=None)  # type: ignore[arg-type]
        node.task = asyncio.create_task(role.run(node.stop))
        self.nodes.append(node)
        async with asyncio.timeout(timeout_s):
            done, _ = await asyncio.wait(
                [node.task, asyncio.ensure_future(serving.wait())], return_when=asyncio.FIRST_COMPLETED
            )
        if node.task in done:
            node.task.result()  # raises the role's error (e.g. a refused config)
        return node

    async def wait_step(self, nodes: list[LiveNode], step: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not all(n.role.server is not None and n.role.server.step >= step for n in nodes):
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        for node in self.nodes:
            if not node.task.done():
                node.stop.set()
        for node in self.nodes:
            try:
                await node.shutdown()
            except (TimeoutError, RuntimeError):
                node.task.cancel()


def small_run(target_batch_size: int = 64, microbatch_size: int = 16) -> RunConfig:
    """The default run with a smaller step (tests need steps, not a good model)."""
    run = RunConfig.from_toml()
    return dataclasses.replace(
        run, batch=dataclasses.replace(run.batch, target_batch_size=target_batch_size, microbatch_size=microbatch_size)
    )


def stage_weights(node: LiveNode) -> list[torch.Tensor]:
    server = node.role.server
    assert server is not None
    with server.lock:
        return [p.detach().clone() for p in server.model.parameters()]
