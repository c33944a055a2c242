"""The ``stage.eval`` RPC: a forward without gradients for the validation loss, its handler and its client.

An evaluating driver sends each held-out microbatch through one peer per stage with `EvalClient.evaluate`: inner
stages answer their outputs, the last stage (given the targets) answers the mean loss. The server computes with
`swarm.training.stage_server.StageServer.evaluate`: no graph is kept, no gradient or sample is accumulated, and no
work receipt is signed (evaluation is not training work). Tensors travel with the run's activation codec and are
decoded with the same limits and checks as ``stage.forward``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.compression import CodecPolicy, Role
from swarm.errors import ProtocolError
from swarm.model.stages import StageInputError
from swarm.p2p import RpcContext, Transport
from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message
from swarm.training.stage_rpc import decode, encode
from swarm.training.stage_server import StageServer

log = logging.getLogger(__name__)

EVAL_METHOD = "stage.eval"


@dataclass(frozen=True, kw_only=True)
class EvalRequest(Message):
    """``stage.eval``: run this stage on ``inputs`` with the weights of ``step``, forward only; ``targets`` (last
    stage only) ask for the loss."""

    run_id: str
    stage: int
    step: int
    inputs: bytes
    targets: bytes | None = None


@dataclass(frozen=True, kw_only=True)
class EvalReply(Message):
    """The stage's ``outputs`` (inner stages), or the microbatch's mean ``loss`` (the last stage)."""

    outputs: bytes | None = None
    loss: float | None = None


class EvalService:
    """Serves ``stage.eval`` for the node's current stage server (`register` / `unregister`)."""

    def __init__(
        self, transport: Transport, policy: CodecPolicy, *, run_id: str, server_of: Callable[[], StageServer | None]
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.run_id = run_id
        self.server_of = server_of

    def register(self) -> None:
        self.transport.register(EVAL_METHOD, EvalRequest, self.rpc_eval)

    def unregister(self) -> None:
        self.transport.unregister(EVAL_METHOD)

    async def rpc_eval(self, ctx: RpcContext, req: EvalRequest) -> EvalReply:
        server = self.server_of()
        if req.run_id != self.run_id:
            raise StageInputError(f"this node trains run {self.run_id!r}, the request is for run {req.run_id!r}")
        if server is None or server.index != req.stage:
            raise StageInputError(f"this node does not serve stage {req.stage} now; refresh the stage records")
        device = next(server.model.parameters()).device
        inputs = decode(req.inputs, "inputs", dtype=server.model.input_spec.dtype, device=device)
        targets = None if req.targets is None else decode(req.targets, "targets", device=device)
        outputs, loss = await asyncio.to_thread(server.evaluate, inputs, targets, step=req.step)
        if outputs is None:
            return EvalReply(loss=loss)
        return EvalReply(outputs=await asyncio.to_thread(encode, outputs, self.policy, Role.ACTIVATIONS))


class EvalClient:
    """Calls ``stage.eval``; a call to this node's own PeerID goes straight to its stage server."""

    def __init__(
        self,
        transport: Transport,
        policy: CodecPolicy,
        *,
        run_id: str,
        rpc_timeout_s: float,
        local_server: Callable[[], StageServer | None],
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.run_id = run_id
        self.rpc_timeout_s = rpc_timeout_s
        self.local_server = local_server

    async def evaluate(
        self, peer: PeerID, *, stage: int, step: int, inputs: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, float | None]:
        """(outputs, None) of an inner stage, or (None, loss) of the last stage given ``targets``."""
        server = self.local_server()
        if peer == self.transport.peer_id and server is not None and server.index == stage:
            return await asyncio.to_thread(server.evaluate, inputs, targets, step=step)
        req = EvalRequest(
            run_id=self.run_id,
            stage=stage,
            step=step,
            inputs=await asyncio.to_thread(encode, inputs, self.policy, Role.ACTIVATIONS),
            targets=None if targets is None else encode(targets, self.policy, Role.ACTIVATIONS),
        )
        reply = await self.transport.call(peer, EVAL_METHOD, req, EvalReply, timeout_s=self.rpc_timeout_s)
        if targets is not None:
            if reply.loss is None:
                raise ProtocolError(f"{peer.short()} answered the last stage's evaluation without a loss")
            return None, reply.loss
        if reply.outputs is None:
            raise ProtocolError(f"{peer.short()} answered stage {stage}'s evaluation without outputs")
        return decode(reply.outputs, f"evaluation outputs of stage {stage} from {peer.short()}"), None
