"""The driver over in-process stage replicas (a `StageClient` implementation): retries, bans, stale steps."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from swarm.run.config import RunConfig
from swarm.data import ShardedData
from swarm.training.driver import Driver, DriverConfig, is_stale_step
from swarm.errors import RemoteError, TransportError
from swarm.p2p import RpcContext, Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.training.progress import StepHint, StepHintReply
from swarm.model import build_stages
from swarm.model.optim import make_optimizer
from swarm.training.stage_server import StageServer, StageServerConfig, StaleStepError
from swarm.training.wiring import NoPeerError, PeerSelector, WiringConfig


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class InProcessClient:
    """A StageClient whose peers are names of in-process StageServers; names in ``dead`` fail like lost peers."""

    def __init__(self, servers: dict[str, StageServer]) -> None:
        self.servers = servers
        self.dead: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def _server(self, peer: str, what: str) -> StageServer:
        self.calls.append((what, peer))
        if peer in self.dead:
            raise TransportError(f"{peer} is gone")
        return self.servers[peer]

    async def forward(
        self, peer: str, *, stage: int, step: int, microbatch_id: str, inputs: torch.Tensor
    ) -> torch.Tensor:
        return self._server(peer, "forward").forward(inputs, step=step, microbatch_id=microbatch_id)

    async def backward(
        self,
        peer: str,
        *,
        stage: int,
        step: int,
        microbatch_id: str,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, float | None]:
        server = self._server(peer, "backward")
        if targets is not None:
            loss, grad = server.loss_backward(inputs, targets, step=step, microbatch_id=microbatch_id)
            return grad, loss
        assert grad_outputs is not None
        return server.backward(inputs, grad_outputs, step=step, microbatch_id=microbatch_id), None


def server(cfg: RunConfig, index: int) -> StageServer:
    stage = build_stages(cfg)[index]
    return StageServer(stage, make_optimizer(stage.parameters(), cfg.optimizer), cfg.optimizer, StageServerConfig())


def make_driver(cfg: RunConfig, client: InProcessClient, layout: dict[int, list[str]], step: list[int]) -> Driver:
    selectors = [PeerSelector(WiringConfig(), clock=Clock(), rng=random.Random(s)) for s in range(2)]
    return Driver(
        DriverConfig(retry_wait_s=0.0, stale_wait_s=0.0, max_stale_retries=5),
        num_stages=2,
        client=client,
        peers_of=lambda s: layout[s],
        selectors=selectors,
        step_of=lambda: step[0],
    )


async def test_microbatch_routes_around_a_dead_replica_and_counts_once() -> None:
    cfg = RunConfig.from_toml()
    servers = {"a0": server(cfg, 0), "b1": server(cfg, 1), "c1": server(cfg, 1)}
    client = InProcessClient(servers)
    client.dead.add("b1")
    driver = make_driver(cfg, client, {0: ["a0"], 1: ["b1", "c1"]}, [0])
    mb = ShardedData(cfg, b"d").microbatch(0, 0)
    loss = await driver.run_microbatch(mb)
    assert 3.0 < loss < 5.0
    assert ("backward", "b1") in client.calls  # tried first (never measured), failed, banned
    assert driver.selectors[1].is_banned("b1")
    assert servers["c1"].samples == mb.num_samples and servers["a0"].samples == mb.num_samples
    assert servers["b1"].samples == 0


async def test_no_live_replica_raises_no_peer_after_retries() -> None:
    cfg = RunConfig.from_toml()
    client = InProcessClient({"a0": server(cfg, 0), "b1": server(cfg, 1)})
    client.dead.add("b1")
    driver = make_driver(cfg, client, {0: ["a0"], 1: ["b1"]}, [0])
    driver.cfg = DriverConfig(retry_wait_s=0.0, max_microbatch_attempts=3)
    with pytest.raises(NoPeerError):
        await driver.run_microbatch(ShardedData(cfg, b"d").microbatch(0, 0))


async def test_closed_step_abandons_the_microbatch_without_counting() -> None:
    cfg = RunConfig.from_toml()
    servers = {"a0": server(cfg, 0), "b1": server(cfg, 1)}
    servers["b1"].close_step()
    step = [0]
    driver = make_driver(cfg, InProcessClient(servers), {0: ["a0"], 1: ["b1"]}, step)
    with pytest.raises(StaleStepError):  # b1 refuses (closed), the driver waits, gives up after max_stale_retries
        await driver.run_microbatch(ShardedData(cfg, b"d").microbatch(0, 0))
    assert not driver.selectors[1].is_banned("b1")  # a stale step is no fault of the peer
    step[0] = 1
    with pytest.raises(StaleStepError, match="closed"):
        await driver.run_microbatch(ShardedData(cfg, b"d").microbatch(0, 1))
    assert servers["a0"].samples == 0


class RemoteClient(InProcessClient):
    """Like `InProcessClient`, but a replica's StaleStepError reaches the driver as a peer's answer would: a
    RemoteError with the error's code (``text`` replaces the message, so the text cannot be what decides)."""

    def __init__(self, servers: dict[str, StageServer], code: str, text: str) -> None:
        super().__init__(servers)
        self.code, self.text = code, text

    async def backward(self, peer: str, **kwargs: object) -> tuple[torch.Tensor | None, float | None]:
        try:
            return await super().backward(peer, **kwargs)  # type: ignore[arg-type]
        except StaleStepError:
            raise RemoteError(self.text, code=self.code) from None


async def test_the_retry_decision_reads_the_code_not_the_text() -> None:
    assert is_stale_step(RemoteError("peer answered (stale_step): anything", code="stale_step"))
    assert not is_stale_step(RemoteError("peer answered (failed): StaleStepError: step 3 closed", code="failed"))
    cfg = RunConfig.from_toml()
    for code, text, stale in (("stale_step", "no telltale text", True), ("failed", "StaleStepError: closed", False)):
        servers = {"a0": server(cfg, 0), "b1": server(cfg, 1)}
        servers["b1"].close_step()
        driver = make_driver(cfg, RemoteClient(servers, code, text), {0: ["a0"], 1: ["b1"]}, [0])
        driver.cfg = DriverConfig(retry_wait_s=0.0, stale_wait_s=0.0, max_stale_retries=5, max_microbatch_attempts=3)
        with pytest.raises(StaleStepError if stale else NoPeerError):
            await driver.run_microbatch(ShardedData(cfg, b"d").microbatch(0, 0))
        # a stale answer is no fault of the peer; any other failure bans it
        assert driver.selectors[1].is_banned("b1") is not stale


async def test_a_remote_stale_step_error_arrives_with_its_code() -> None:
    identities = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(2)]
    transports = [Transport(i, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",))) for i in identities]

    async def closed(ctx: RpcContext, request: StepHint) -> StepHintReply:
        raise StaleStepError(f"stage 1 is not accepting work for step {request.step}; retry")

    try:
        for t in transports:
            await t.start()
        transports[0].register("test.closed", StepHint, closed)
        async with asyncio.timeout(20):
            with pytest.raises(RemoteError) as caught:
                await transports[1].call(
                    transports[0].listen_maddrs[0], "test.closed", StepHint(run_id="r", step=3), StepHintReply
                )
    finally:
        for t in transports:
            await t.stop()
    assert caught.value.code == "stale_step" and is_stale_step(caught.value)
