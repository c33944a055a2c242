"""bf16 compute on the serving path: stage servers keep float32 weights, gradients and AdamW state, pass bf16
activations through the wire codecs, and a validator's `StageReplayer` recomputes their work bit for bit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import torch

from swarm.compression import Role, deserialize_tensor
from swarm.data import ShardedData
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stages
from swarm.p2p.identity import Identity
from swarm.run.config import RunConfig
from swarm.training.checkpoint import capture_state
from swarm.training.replayer import StageReplayer
from swarm.training.stage_rpc import decode, encode
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.verification.compare import ToleranceConfig, compare_tensor


def run(precision: str) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"num_blocks": 3, "d_model": 32, "seq_len": 16},
            "pipeline": {"num_stages": 3},
            "batch": {"target_batch_size": 8, "microbatch_size": 4},
            "precision": {"compute": precision},
        }
    )


def servers_of(cfg: RunConfig, device: str = "cpu") -> list[StageServer]:
    models = [m.to(device) for m in build_stages(cfg)]
    return [
        StageServer(m, make_optimizer(m.parameters(), cfg.optimizer), cfg.optimizer, StageServerConfig())
        for m in models
    ]


def wire(tensor: torch.Tensor, cfg: RunConfig, role: Role, dtype: torch.dtype) -> tuple[bytes, torch.Tensor]:
    """The bytes a tensor goes on the wire as, and what the receiving stage decodes (as `StageService` does)."""
    data = encode(tensor, cfg.codecs.policy(), role)
    return data, decode(data, "test", dtype=dtype)


@dataclass
class Call:
    """One served call: its stage and kind, its wire inputs (what a receipt holds) and what the server returned."""

    stage: int
    kind: str
    inputs: list[bytes]
    out: torch.Tensor | None
    loss: float | None = None


def serve_step(cfg: RunConfig, servers: list[StageServer], step: int) -> list[Call]:
    """One step of two microbatches through the servers over the wire codecs; returns every call."""
    data = ShardedData(cfg, b"precision")
    calls: list[Call] = []
    for index in range(2):
        mb, mb_id = data.microbatch(step, index, 4), f"mb{step}/{index}"
        inputs = [encode(mb.inputs, cfg.codecs.policy(), Role.ACTIVATIONS)]
        acts = [mb.inputs]
        for s in servers[:-1]:
            out = s.forward(acts[-1], step=step, microbatch_id=mb_id)
            calls.append(Call(stage=s.index, kind="forward", inputs=[inputs[-1]], out=out))
            data_out, received = wire(out, cfg, Role.ACTIVATIONS, servers[s.index + 1].model.input_spec.dtype)
            inputs.append(data_out)
            acts.append(received)
        targets = encode(mb.targets, cfg.codecs.policy(), Role.ACTIVATIONS)
        loss, grad = servers[-1].loss_backward(acts[-1], mb.targets, step=step, microbatch_id=mb_id)
        calls.append(Call(stage=len(servers) - 1, kind="backward", inputs=[inputs[-1], targets], out=grad, loss=loss))
        for s in reversed(servers[:-1]):
            assert grad is not None
            grad_bytes, grad = wire(grad, cfg, Role.ACTIVATION_GRADS, s.model.activation_dtype)
            out = s.backward(acts[s.index], grad, step=step, microbatch_id=mb_id)
            calls.append(Call(stage=s.index, kind="backward", inputs=[inputs[s.index], grad_bytes], out=out))
            grad = out
    return calls


def test_bf16_serving_keeps_fp32_weights_and_optimizer_state_and_tracks_fp32() -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = run(precision)
        servers = servers_of(cfg)
        calls = serve_step(cfg, servers, 0)
        losses[precision] = [c.loss for c in calls if c.loss is not None]
        for s in servers:
            s.close_step()
            s.apply_step(s.mean_gradients())
            assert all(
                p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                for p in s.parameters()
            )
            states = [v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
            assert states and all(v.dtype == torch.float32 for v in states if v.dim() > 0)  # exp_avg, exp_avg_sq
        wire_dtypes = {deserialize_tensor(c.inputs[0]).dtype for c in calls if c.stage > 0}
        assert wire_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    for bf16, fp32 in zip(losses["bf16"], losses["fp32"], strict=True):
        assert abs(bf16 - fp32) < 0.02 * fp32


def test_a_replay_of_bf16_work_is_bit_equal_to_serving() -> None:
    cfg = run("bf16")
    servers = servers_of(cfg)
    peers = [Identity.from_seed(hashlib.sha256(f"precision-{i}".encode()).digest()).peer_id for i in range(3)]
    replayer = StageReplayer(cfg, keep_steps=4)
    for step in range(2):  # the second step replays with weights after a bf16 update
        for s in servers:
            state = capture_state(s.model, s.optimizer, run_id=cfg.run_id, stage=s.index, step=step)
            replayer.add_state(state, peers[s.index])
        calls = serve_step(cfg, servers, step)
        for call in calls:
            replayed = replayer.recompute(
                stage=call.stage, step=step, kind=call.kind, inputs=call.inputs, server=peers[call.stage]
            )
            if call.out is None:
                assert replayed == []  # stage 0's inputs are token ids: no gradient
                continue
            assert len(replayed) == 1 and replayed[0].dtype == call.out.dtype
            assert torch.equal(replayed[0], call.out), (call.stage, call.kind)
        for s in servers:
            s.close_step()
            s.apply_step(s.mean_gradients())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_work_served_on_cuda_replays_on_the_cpu_within_tolerance() -> None:
    cfg = run("bf16")
    servers = servers_of(cfg, "cuda")
    assert all(p.is_cuda and p.dtype == torch.float32 for s in servers for p in s.parameters())
    peers = [Identity.from_seed(hashlib.sha256(f"cuda-{i}".encode()).digest()).peer_id for i in range(3)]
    replayer = StageReplayer(cfg, keep_steps=4)  # a validator replays on its CPU
    for s in servers:
        replayer.add_state(
            capture_state(s.model, s.optimizer, run_id=cfg.run_id, stage=s.index, step=0), peers[s.index]
        )
    for call in serve_step(cfg, servers, 0):
        replayed = replayer.recompute(
            stage=call.stage, step=0, kind=call.kind, inputs=call.inputs, server=peers[call.stage]
        )
        if call.out is not None:
            result = compare_tensor(replayed[0], call.out.cpu(), ToleranceConfig())
            assert result.passed, (call.stage, call.kind, result.reason)
    for s in servers:
        s.close_step()
        s.apply_step(s.mean_gradients())
        states = [v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        assert all(v.dtype == torch.float32 for v in states if v.dim() > 0)
