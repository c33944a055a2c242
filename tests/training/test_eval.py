"""The validation loss: forward-only evaluation on stage servers, the ``stage.eval`` RPC, the driver's evaluation
pipeline, the held-out microbatches, and how the records, the table and the summary carry the result."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from swarm.data import ShardedData
from swarm.errors import RemoteError
from swarm.model import PipelineModel, StageInputError, build_stages
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.run.config import RunConfig
from swarm.training.driver import Driver, DriverConfig
from swarm.training.eval_rpc import EvalClient, EvalService
from swarm.training.messages import PeerRecord
from swarm.training.node_role import Role
from swarm.training.progress import ProgressRecord
from swarm.training.stage_server import StageServer, StaleStepError
from swarm.training.summary import NodeSummary
from swarm.training.view import SwarmView, format_table
from swarm.training.wiring import PeerSelector, WiringConfig
from tests.training.test_driver import Clock, server


class InProcessEvaluator:
    """An `Evaluator` whose peers are names of in-process StageServers; names in ``dead`` fail like lost peers."""

    def __init__(self, servers: dict[str, StageServer]) -> None:
        self.servers = servers
        self.dead: set[str] = set()
        self.calls: list[str] = []

    async def evaluate(
        self, peer: str, *, stage: int, step: int, inputs: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, float | None]:
        self.calls.append(peer)
        if peer in self.dead:
            raise ConnectionResetError(f"{peer} is gone")
        return self.servers[peer].evaluate(inputs, targets, step=step)


def _zero_grads(s: StageServer) -> bool:
    return all(not bool(p.grad.abs().sum()) for p in s.parameters() if p.grad is not None)


def test_evaluate_is_the_models_loss_without_gradients_or_accumulation() -> None:
    cfg = RunConfig.from_toml()
    servers = [server(cfg, i) for i in range(cfg.pipeline.num_stages)]
    mb = ShardedData(cfg, b"d").eval_microbatch(0, 0)
    outputs, none = servers[0].evaluate(mb.inputs, None, step=0)
    assert none is None and outputs is not None and not outputs.requires_grad
    _, loss = servers[1].evaluate(outputs, mb.targets, step=0)
    reference = PipelineModel(build_stages(cfg)).loss(mb.inputs, mb.targets)
    assert loss == pytest.approx(float(reference.detach()), rel=1e-5)
    assert all(s.samples == 0 and s.total_samples == 0 and _zero_grads(s) for s in servers)
    with pytest.raises(StaleStepError):
        servers[0].evaluate(mb.inputs, None, step=1)
    with pytest.raises(StageInputError, match="last stage"):
        servers[0].evaluate(mb.inputs, mb.targets, step=0)
    servers[1].close_step()  # closed for averaging: the step's weights are still there
    assert servers[1].evaluate(outputs, mb.targets, step=0)[1] == loss


def test_held_out_microbatches_are_the_same_everywhere_and_not_training_draws() -> None:
    cfg = RunConfig.from_toml()
    a, b = ShardedData(cfg, b"driver-a"), ShardedData(cfg, b"driver-b")
    first = a.eval_microbatch(0, 1)
    assert torch.equal(first.inputs, b.eval_microbatch(7, 1).inputs)  # any driver, any step
    assert torch.equal(first.targets[:, :-1], first.inputs[:, 1:])
    assert first.num_samples == cfg.batch.microbatch_size and first.step == 0
    assert not torch.equal(first.inputs, a.eval_microbatch(0, 2).inputs)
    assert not torch.equal(first.inputs, a.microbatch(0, 1).inputs)


async def test_driver_evaluates_through_the_pipeline_around_a_dead_replica() -> None:
    cfg = RunConfig.from_toml()
    servers = {"a0": server(cfg, 0), "b1": server(cfg, 1), "c1": server(cfg, 1)}
    evaluator = InProcessEvaluator(servers)
    evaluator.dead.add("b1")
    layout = {0: ["a0"], 1: ["b1", "c1"]}
    step = [0]
    driver = Driver(
        DriverConfig(retry_wait_s=0.0, stale_wait_s=0.0, max_stale_retries=5),
        num_stages=2,
        client=None,  # type: ignore[arg-type]  # evaluation never calls the training client
        peers_of=lambda s: layout[s],
        selectors=[PeerSelector(WiringConfig(), clock=Clock(), rng=random.Random(s)) for s in range(2)],
        step_of=lambda: step[0],
    )
    mb = ShardedData(cfg, b"d").eval_microbatch(0, 0)
    loss = await driver.evaluate(mb, evaluator)
    assert loss == pytest.approx(float(PipelineModel(build_stages(cfg)).loss(mb.inputs, mb.targets).detach()), rel=1e-5)
    assert "b1" in evaluator.calls and "c1" in evaluator.calls
    assert all(s.samples == 0 for s in servers.values())
    step[0] = 1  # the step closed: the evaluation of step 0 ends
    with pytest.raises(StaleStepError):
        await driver.evaluate(mb, evaluator)


async def test_stage_eval_rpc_answers_outputs_then_the_loss() -> None:
    cfg = RunConfig.from_toml()
    servers = [server(cfg, i) for i in range(2)]
    identities = [Identity.from_seed(bytes([60 + i]) * 32) for i in range(2)]
    transports = [Transport(i, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",))) for i in identities]
    policy = cfg.codecs.policy()
    current: list[StageServer] = [servers[0]]
    service = EvalService(transports[0], policy, run_id=cfg.run_id, server_of=lambda: current[0])
    client = EvalClient(transports[1], policy, run_id=cfg.run_id, rpc_timeout_s=10.0, local_server=lambda: None)
    mb = ShardedData(cfg, b"d").eval_microbatch(0, 0)
    try:
        for t in transports:
            await t.start()
        service.register()
        peer: PeerID = transports[0].peer_id
        transports[1].add_addresses(peer, [parse_maddr(m) for m in transports[0].listen_maddrs])
        async with asyncio.timeout(30):
            outputs, none = await client.evaluate(peer, stage=0, step=0, inputs=mb.inputs)
            assert none is None and outputs is not None
            current[0] = servers[1]
            _, loss = await client.evaluate(peer, stage=1, step=0, inputs=outputs, targets=mb.targets)
            with pytest.raises(RemoteError, match="does not serve stage 0"):
                await client.evaluate(peer, stage=0, step=0, inputs=mb.inputs)
    finally:
        service.unregister()
        for t in transports:
            await t.stop()
    assert loss == pytest.approx(float(PipelineModel(build_stages(cfg)).loss(mb.inputs, mb.targets).detach()), rel=1e-5)


def test_records_table_and_summary_carry_the_validation_loss(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ProgressRecord(step=1, samples=0, samples_per_s=0.0, eval_step=1)
    view = SwarmView()
    a, b = (Identity.from_seed(bytes([70 + i]) * 32).peer_id for i in range(2))
    view.progress[a] = ProgressRecord(step=4, samples=8, samples_per_s=1.0, loss=5.0, eval_step=0, eval_loss=7.6)
    view.progress[b] = ProgressRecord(step=5, samples=8, samples_per_s=1.0, loss=4.0, eval_step=5, eval_loss=5.25)
    view.peers[a] = PeerRecord(role=Role.AUTO, stage=0, maddrs=[], throughput=1.0, step=5, config_hash="h")
    view.peers[b] = PeerRecord(role=Role.AUTO, stage=1, maddrs=[], throughput=1.0, step=5, config_hash="h")
    assert view.drivers() == [a] and view.latest_eval() == (5, 5.25)
    assert "eval 5.250 (step 5)" in format_table(view.summary(2))
    assert "eval" not in format_table(SwarmView().summary(2))
    summary = NodeSummary(peer_id="p", role=Role.AUTO, run_id="r", step=5, elapsed_s=1.0, eval_losses={0: 7.6, 5: 5.2})
    path = tmp_path / "s.json"
    summary.write(path)
    assert NodeSummary.read(path).eval_losses == {0: 7.6, 5: 5.2}
