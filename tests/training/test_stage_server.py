"""Stage servers: pipeline gradients equal single-process gradients; replica-independent backward; checks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from swarm.training.checkpoint import CheckpointError, apply_state, capture_state, load_state, save_state
from swarm.run.config import RunConfig
from swarm.data import ShardedData
from swarm.errors import SwarmError
from swarm.model import PipelineModel, StageInputError, build_stages
from swarm.model.optim import make_optimizer
from swarm.training.stage_server import StageServer, StageServerConfig, StaleStepError


def make_server(cfg: RunConfig, index: int) -> StageServer:
    stage = build_stages(cfg)[index]
    return StageServer(stage, make_optimizer(stage.parameters(), cfg.optimizer), cfg.optimizer, StageServerConfig())


@pytest.fixture
def cfg() -> RunConfig:
    return RunConfig.from_toml()


def run_microbatch(
    servers: list[StageServer],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mb: str,
    backward_servers: list[StageServer] | None = None,
) -> float:
    backward_servers = backward_servers or servers
    acts = [inputs]
    for s in servers[:-1]:
        acts.append(s.forward(acts[-1], step=0, microbatch_id=mb))
    loss, grad = backward_servers[-1].loss_backward(acts[-1], targets, step=0, microbatch_id=mb)
    for i in range(len(servers) - 2, -1, -1):
        grad = backward_servers[i].backward(acts[i], grad, step=0, microbatch_id=mb)
    assert grad is None
    return loss


def test_pipeline_mean_gradients_equal_single_process(cfg: RunConfig) -> None:
    servers = [make_server(cfg, i) for i in range(cfg.pipeline.num_stages)]
    reference = PipelineModel(build_stages(cfg))
    data = ShardedData(cfg, b"t")
    batches = [data.microbatch(0, i, n) for i, n in enumerate((5, 3))]
    for i, b in enumerate(batches):
        run_microbatch(servers, b.inputs, b.targets, f"mb{i}")
    total = sum(b.num_samples for b in batches)
    for b in batches:
        (reference.loss(b.inputs, b.targets) * b.num_samples / total).backward()
    assert all(s.samples == total for s in servers)
    got = {
        f"stages.{s.index}.{name}": g
        for s in servers
        for (name, _), g in zip(s.model.named_parameters(), s.mean_gradients(), strict=False)
    }
    tied = [f"stages.{s.index}.{s.model.tied_name}" for s in servers]
    assert tied == ["stages.0.body.0.tokens.weight", "stages.1.body.1.weight"]
    got[tied[0]] = got[tied[0]] + got.pop(tied[1])  # what swarm.training.tied does across the two stages
    want = dict(reference.named_parameters())  # the tied matrix appears once, under its stage-0 name
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w.grad, rtol=1e-4, atol=1e-6)


def test_backward_on_another_replica_recomputes(cfg: RunConfig) -> None:
    a = [make_server(cfg, i) for i in range(2)]
    b = [make_server(cfg, i) for i in range(2)]
    mb = ShardedData(cfg, b"t").microbatch(0, 0)
    run_microbatch(a, mb.inputs, mb.targets, "x")
    ref = [g.clone() for s in a for g in s.mean_gradients()]
    fresh = [make_server(cfg, i) for i in range(2)]
    run_microbatch(b, mb.inputs, mb.targets, "x", backward_servers=fresh)
    assert b[0].samples == 0 and fresh[0].samples == mb.num_samples
    for g, w in zip([g for s in fresh for g in s.mean_gradients()], ref, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_wrong_shape_dtype_and_stale_step_are_rejected(cfg: RunConfig) -> None:
    s1 = make_server(cfg, 1)
    good = torch.zeros(2, cfg.model.seq_len, cfg.model.d_model)
    targets = torch.zeros(2, cfg.model.seq_len, dtype=torch.int64)
    with pytest.raises(StageInputError, match="float32"):
        s1.loss_backward(good.double(), targets, step=0, microbatch_id="a")
    with pytest.raises(StageInputError, match="shape"):
        s1.loss_backward(good[:, :, :3], targets, step=0, microbatch_id="a")
    with pytest.raises(StageInputError, match="targets"):
        s1.loss_backward(good, targets[:, :3], step=0, microbatch_id="a")
    with pytest.raises(StaleStepError):
        s1.loss_backward(good, targets, step=1, microbatch_id="a")
    s1.close_step()
    with pytest.raises(StaleStepError, match="not accepting"):
        s1.loss_backward(good, targets, step=0, microbatch_id="a")
    s0 = make_server(cfg, 0)
    with pytest.raises(StageInputError, match="grad_outputs"):
        s0.backward(targets, torch.zeros(2, 3), step=0, microbatch_id="a")
    assert s1.samples == 0 and s0.samples == 0


def test_apply_step_updates_and_checkpoint_round_trips(cfg: RunConfig, tmp_path: Path) -> None:
    s = make_server(cfg, 1)
    mb = ShardedData(cfg, b"t").microbatch(0, 0)
    hidden = make_server(cfg, 0).forward(mb.inputs, step=0, microbatch_id="m")
    s.loss_backward(hidden, mb.targets, step=0, microbatch_id="m")
    before = [p.detach().clone() for p in s.parameters()]
    s.apply_step(s.mean_gradients())
    assert s.step == 1 and s.samples == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, s.parameters(), strict=False))
    state = capture_state(s.model, s.optimizer, run_id=cfg.run_id, stage=1, step=s.step)
    save_state(tmp_path / "stage.safetensors", state)
    loaded = load_state(tmp_path / "stage.safetensors")
    assert loaded.step == 1 and set(loaded.tensors) == set(state.tensors)
    other = make_server(cfg, 1)
    apply_state(other.model, other.optimizer, loaded, run_id=cfg.run_id, stage=1)
    for p, q in zip(other.parameters(), s.parameters(), strict=False):
        assert torch.equal(p, q)
    # the same gradient applied to both gives the same weights: the optimizer state came along
    grads = [torch.ones_like(p) for p in s.parameters()]
    s.apply_step(grads)
    other.step = 1
    other.apply_step(grads)
    for p, q in zip(other.parameters(), s.parameters(), strict=False):
        torch.testing.assert_close(p, q)
    with pytest.raises(CheckpointError, match="stage"):
        apply_state(other.model, other.optimizer, loaded, run_id=cfg.run_id, stage=0)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path / "bad.safetensors")


async def test_stage_service_refuses_work_for_caught_peers(cfg: RunConfig) -> None:
    """A caller this node's gradient checks caught gets a clear error and no work; others are served."""
    from swarm.compression import Role
    from swarm.p2p.identity import Identity
    from swarm.p2p import RpcContext
    from swarm.training.messages import ForwardRequest
    from swarm.training.stage_rpc import StageService, encode

    server = make_server(cfg, 0)
    cheater, honest = Identity.generate().peer_id, Identity.generate().peer_id
    service = StageService(
        transport=None,
        policy=cfg.codecs.policy(),
        run_id=cfg.run_id,  # type: ignore[arg-type]
        server_of=lambda: server,
        refuse=lambda peer: peer == cheater,
    )
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    req = ForwardRequest(
        run_id=cfg.run_id,
        stage=0,
        step=0,
        microbatch_id="mb",
        inputs=encode(tokens, cfg.codecs.policy(), Role.ACTIVATIONS),
    )

    def ctx(peer):
        return RpcContext(peer_id=peer, remote_host="127.0.0.1", remote_port=1, method="stage.forward")

    with pytest.raises(StageInputError, match="gradient checks caught it"):
        await service.rpc_forward(ctx(cheater), req)
    reply = await service.rpc_forward(ctx(honest), req)
    assert reply.outputs


def test_apply_step_replaces_parameters_with_the_update_and_refuses_a_wrong_shape(cfg: RunConfig) -> None:
    server = make_server(cfg, 0)
    zeros = [torch.zeros_like(p) for p in server.parameters()]
    server.close_step()
    with pytest.raises(SwarmError, match="parameter 0 replaced by shape"):
        server.apply_step(zeros, replace={0: torch.ones(3)})
    assert server.step == 0  # nothing applied
    target = torch.full_like(server.parameters()[0], 0.5)
    server.apply_step(zeros, replace={0: target})
    assert server.step == 1
    torch.testing.assert_close(server.parameter_copy(0), target)  # zero gradient: AdamW leaves the value


async def test_stage_service_holds_a_request_for_the_next_step_until_the_server_gets_there(cfg: RunConfig) -> None:
    """A request for the step after the server's waits (``wait_step``) and is served once the step advances; one for
    a step further ahead is refused as stale at once."""
    import asyncio

    from swarm.compression import Role
    from swarm.p2p.identity import Identity
    from swarm.p2p import RpcContext
    from swarm.training.messages import ForwardRequest
    from swarm.training.stage_rpc import StageService, encode

    server = make_server(cfg, 0)
    advanced = asyncio.Event()
    waits: list[int] = []

    async def wait_step(step: int) -> None:
        waits.append(step)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await advanced.wait()

    service = StageService(
        transport=None,  # type: ignore[arg-type]
        policy=cfg.codecs.policy(),
        run_id=cfg.run_id,
        server_of=lambda: server,
        wait_step=wait_step,
    )
    tokens = encode(
        torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len)), cfg.codecs.policy(), Role.ACTIVATIONS
    )
    ctx = RpcContext(
        peer_id=Identity.generate().peer_id, remote_host="127.0.0.1", remote_port=1, method="stage.forward"
    )

    def request(step: int) -> ForwardRequest:
        return ForwardRequest(run_id=cfg.run_id, stage=0, step=step, microbatch_id=f"mb{step}", inputs=tokens)

    with pytest.raises(StaleStepError):
        await service.rpc_forward(ctx, request(2))  # two steps ahead: refused at once
    assert waits == []
    held = asyncio.create_task(service.rpc_forward(ctx, request(1)))
    await asyncio.sleep(0.1)
    assert not held.done()  # held, not refused
    server.close_step()
    server.apply_step([torch.zeros_like(p) for p in server.parameters()])
    advanced.set()
    reply = await asyncio.wait_for(held, 5.0)
    assert reply.outputs and server.step == 1 and waits == [1]
