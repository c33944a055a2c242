"""The ``stage.*`` and ``state.*`` RPCs: handlers serving a `StageServer`, and the clients drivers use.

Tensors are encoded with the run's codec per role (activations forward, activation gradients backward, the
state codec for downloads) and decoded with size limits; a request whose tensors do not fit the stage (shape,
dtype, range, NaN) is rejected with `StageInputError` and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
import torch

from swarm.compression import (
    ChunkAssembler,
    CodecPolicy,
    Role,
    deserialize_tensor,
    iter_encode_chunks,
    serialize_tensor,
)
from swarm.p2p.identity import PeerID
from swarm.p2p import RpcContext, Transport
from swarm.training.checkpoint import StageState, capture_state
from swarm.training.hooks import HONEST, NodeHooks
from swarm.errors import CodecError, ProtocolError, SwarmError
from swarm.training.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    StateHeader,
    StateRequest,
    TensorInfo,
)
from swarm.model.stages import StageInputError
from swarm.training.stage_server import StageServer
from swarm.verification.witness import ReceiptCollector, ServerWitness

log = logging.getLogger(__name__)

MAX_TENSOR_NUMEL = 1 << 26
MAX_OWN_WORK = 256  # own-stage forwards remembered until the next stage's request carries their witness
M = TypeVar("M", ForwardRequest, BackwardRequest)
STATE_CHUNK_SIZE_BYTES = 256 * 1024


def encode(tensor: torch.Tensor, policy: CodecPolicy, role: Role) -> bytes:
    """A tensor's wire bytes with the codec the policy picks for ``role``."""
    tensor = tensor.detach().cpu().contiguous()
    return serialize_tensor(tensor, policy.codec_for(role, tensor))


def decode(
    data: bytes, what: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Decode untrusted tensor bytes with limits; StageInputError (the request is rejected) if they are bad."""
    try:
        tensor = deserialize_tensor(data, max_numel=MAX_TENSOR_NUMEL)
    except (CodecError, ProtocolError) as e:
        raise StageInputError(f"{what}: undecodable tensor ({e})") from None
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)  # lossy codecs (fp16, blockwise8) decode to their own float type
    return tensor.to(device) if device is not None else tensor


class StageService:
    """Registers ``stage.forward``, ``stage.backward``, ``state.download`` for the node's current stage server."""

    def __init__(
        self,
        transport: Transport,
        policy: CodecPolicy,
        *,
        run_id: str,
        server_of: Callable[[], StageServer | None],
        witness: ServerWitness | None = None,
        collector: ReceiptCollector | None = None,
        hooks: NodeHooks = HONEST,
        refuse: Callable[[PeerID], bool] | None = None,
        wait_step: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.run_id = run_id
        self.server_of = server_of
        # a request for the step after the server's waits here (bounded) until the server gets there, instead of
        # being refused as stale: the driver's next step often starts before this stage's averaging is done
        self.wait_step = wait_step
        self.witness = witness  # verification: retains served work for verify.fetch and acks it
        self.collector = collector  # verification: signs receipts for callers' own upstream work
        self.hooks = hooks  # what the server returns passes through hooks.stage_outputs
        self.refuse = refuse  # callers this node serves no work for (caught by its gradient checks)

    def register(self) -> None:
        self.transport.register("stage.forward", ForwardRequest, self.rpc_forward)
        self.transport.register("stage.backward", BackwardRequest, self.rpc_backward)
        self.transport.register_stream("state.download", StateRequest, self.rpc_state_download)
        if self.witness is not None:
            self.witness.service.register(self.transport)

    def unregister(self) -> None:
        """Stop serving what `register` registered (the transport is shared and stays up)."""
        for method in ("stage.forward", "stage.backward", "state.download"):
            self.transport.unregister(method)
        if self.witness is not None:
            self.witness.service.unregister(self.transport)

    def _ack(
        self,
        ctx: RpcContext,
        req: ForwardRequest | BackwardRequest,
        kind: str,
        outputs: list[bytes],
        num_samples: int,
        weights: bytes,
    ) -> bytes:
        """Retain the served payloads and sign the work claim naming ``weights`` (b"" when verification is off)."""
        if req.upstream and self.collector is not None:
            self.collector.record_upstream(
                server=ctx.peer_id, step=req.step, upstream=req.upstream, received=[req.inputs]
            )
        if self.witness is None:
            return b""
        inputs = (
            [req.inputs] if isinstance(req, ForwardRequest) else [req.inputs, req.grad_outputs or req.targets or b""]
        )
        return self.witness.witness(
            caller=ctx.peer_id,
            step=req.step,
            stage=req.stage,
            microbatch_id=req.microbatch_id,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            num_samples=num_samples,
            weights=weights,
        )

    def _check_caller(self, ctx: RpcContext) -> None:
        if self.refuse is not None and self.refuse(ctx.peer_id):
            raise StageInputError(
                f"refusing work for {ctx.peer_id.short()}: this node's gradient checks caught it "
                "sending outlier or replayed gradients"
            )

    async def _server_at(self, run_id: str, stage: int, step: int) -> StageServer:
        """`_server`, after waiting (``wait_step``, bounded) when ``step`` is the one after the server's: a driver's
        next step may open before this stage is done averaging, and a refusal would cost it a round trip and a wait."""
        server = self._server(run_id, stage)
        if self.wait_step is not None and step == server.step + 1:
            await self.wait_step(step)
            server = self._server(run_id, stage)
        return server

    def _server(self, run_id: str, stage: int) -> StageServer:
        server = self.server_of()
        if run_id != self.run_id:
            raise StageInputError(f"this node trains run {self.run_id!r}, the request is for run {run_id!r}")
        if server is None or server.index != stage:
            raise StageInputError(f"this node does not serve stage {stage} now; refresh the stage records and retry")
        return server

    async def rpc_forward(self, ctx: RpcContext, req: ForwardRequest) -> ForwardReply:
        self._check_caller(ctx)
        server = await self._server_at(req.run_id, req.stage, req.step)
        device = _device_of(server)
        inputs = decode(req.inputs, "inputs", dtype=server.model.input_spec.dtype, device=device)
        out = await asyncio.to_thread(
            server.forward, inputs, step=req.step, microbatch_id=f"{ctx.peer_id.to_base58()}/{req.microbatch_id}"
        )
        out = self.hooks.stage_outputs("forward", out)
        encoded = await asyncio.to_thread(encode, out, self.policy, Role.ACTIVATIONS)
        weights = server.weights_digest_of(req.step)
        ack = self._ack(ctx, req, "forward", [encoded], int(inputs.shape[0]), weights)
        return ForwardReply(outputs=encoded, ack=ack, weights=weights)

    async def rpc_backward(self, ctx: RpcContext, req: BackwardRequest) -> BackwardReply:
        self._check_caller(ctx)
        server = await self._server_at(req.run_id, req.stage, req.step)
        device = _device_of(server)
        inputs = decode(req.inputs, "inputs", dtype=server.model.input_spec.dtype, device=device)
        mb_id = f"{ctx.peer_id.to_base58()}/{req.microbatch_id}"
        if req.targets is not None:
            targets = decode(req.targets, "targets", device=device)
            loss, grad = await asyncio.to_thread(
                server.loss_backward, inputs, targets, step=req.step, microbatch_id=mb_id
            )
        else:
            grad_out = decode(
                req.grad_outputs or b"", "grad_outputs", dtype=server.model.activation_dtype, device=device
            )
            loss = None
            grad = await asyncio.to_thread(server.backward, inputs, grad_out, step=req.step, microbatch_id=mb_id)
        if grad is not None:
            grad = self.hooks.stage_outputs("backward", grad)
        encoded = None if grad is None else await asyncio.to_thread(encode, grad, self.policy, Role.ACTIVATION_GRADS)
        weights = server.weights_digest_of(req.step)
        ack = self._ack(ctx, req, "backward", [] if encoded is None else [encoded], int(inputs.shape[0]), weights)
        return BackwardReply(grad_inputs=encoded, loss=loss, ack=ack, weights=weights)

    async def rpc_state_download(
        self, ctx: RpcContext, req: StateRequest, chunks: AsyncIterator[bytes]
    ) -> tuple[StateHeader, AsyncIterator[bytes]]:
        server = self._server(req.run_id, req.stage)
        state = await asyncio.to_thread(_capture, server, self.run_id)
        names = sorted(state.tensors)
        header = StateHeader(
            run_id=self.run_id,
            stage=server.index,
            step=state.step,
            tensors=[TensorInfo(name=n, shape=list(state.tensors[n].shape)) for n in names],
        )
        flat = torch.cat([state.tensors[n].reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
        codec = self.policy.codec_for(Role.STATE, flat)
        log.info(
            "%s: sending stage %d state of step %d (%d values) to %s",
            self.transport.peer_id.short(),
            server.index,
            state.step,
            flat.numel(),
            ctx.peer_id.short(),
        )

        async def body() -> AsyncIterator[bytes]:
            for chunk in iter_encode_chunks(flat, codec, STATE_CHUNK_SIZE_BYTES):
                yield chunk

        return header, body()


def _capture(server: StageServer, run_id: str) -> StageState:
    with server.lock:
        return capture_state(
            server.model,
            server.optimizer,
            run_id=run_id,
            stage=server.index,
            step=server.step,
            extra=server.extra_state,
        )


def _device_of(server: StageServer) -> torch.device:
    return next(server.model.parameters()).device


async def call_state_download(
    transport: Transport, peer: PeerID, *, run_id: str, stage: int, timeout_s: float
) -> StageState:
    """Download a stage's state from ``peer``; the tensors are checked against the announced layout."""
    async with transport.open_stream(
        peer, "state.download", StateRequest(run_id=run_id, stage=stage), StateHeader, timeout_s=timeout_s
    ) as stream:
        header = stream.reply
        if not isinstance(header, StateHeader) or header.run_id != run_id or header.stage != stage:
            raise ProtocolError(f"{peer.short()} answered state.download with the state of another run or stage")
        total = sum(_numel(t.shape) for t in header.tensors)
        if total > MAX_TENSOR_NUMEL:
            raise ProtocolError(
                f"{peer.short()} announced a state of {total} values, over the limit {MAX_TENSOR_NUMEL}"
            )
        assembler = ChunkAssembler(max_numel=MAX_TENSOR_NUMEL)
        async for chunk in stream.chunks():
            assembler.add(chunk)
        flat = assembler.result() if total else torch.zeros(0)
    if flat.numel() != total:
        raise ProtocolError(f"{peer.short()} sent {flat.numel()} state values, the header announced {total}")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for info in header.tensors:
        n = _numel(info.shape)
        tensors[info.name] = flat[offset : offset + n].float().reshape(info.shape).clone()
        offset += n
    return StageState(run_id=run_id, stage=stage, step=header.step, tensors=tensors)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise ProtocolError(f"negative dimension in a state tensor shape {shape}")
        n *= d
    return n


class RemoteStageClient:
    """A `StageClient` over the transport; calls to this node's own PeerID go straight to its stage server."""

    def __init__(
        self,
        transport: Transport,
        policy: CodecPolicy,
        *,
        run_id: str,
        rpc_timeout_s: float,
        local_server: Callable[[], StageServer | None],
        collector: ReceiptCollector | None = None,
        witness: ServerWitness | None = None,
        hooks: NodeHooks = HONEST,
        activation_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.run_id = run_id
        self.rpc_timeout_s = rpc_timeout_s
        self.activation_dtype = activation_dtype  # of the run's precision: outputs and gradients are decoded to it
        self.local_server = local_server
        self.collector = collector  # verification: signs a receipt for each acknowledged remote result
        self.witness = witness  # verification: witnesses this node's own stage work for the next stage's server
        self.hooks = hooks  # what the server returns passes through hooks.stage_outputs
        # mb id -> stage, inputs, samples, the weights' digest
        self._own_work: OrderedDict[str, tuple[int, bytes, int, bytes]] = OrderedDict()

    def _attach_upstream(self, peer: PeerID, req: M) -> M:
        """Attach the witness of this node's own previous-stage forward of this microbatch, if it did one."""
        own = self._own_work.pop(req.microbatch_id, None)
        if own is None or self.witness is None or own[0] != req.stage - 1:
            return req
        stage, inputs, num_samples, weights = own
        upstream = self.witness.upstream(
            next_server=peer,
            step=req.step,
            stage=stage,
            microbatch_id=req.microbatch_id,
            inputs=[inputs],
            outputs=[req.inputs],
            num_samples=num_samples,
            weights=weights,
        )
        return dataclasses.replace(req, upstream=upstream)

    async def _local_forward(
        self, local: StageServer, *, stage: int, step: int, microbatch_id: str, inputs: torch.Tensor
    ) -> torch.Tensor:
        out = await asyncio.to_thread(local.forward, inputs, step=step, microbatch_id=microbatch_id)
        out = self.hooks.stage_outputs("forward", out)
        if self.witness is not None:
            self._own_work[microbatch_id] = (
                stage,
                await asyncio.to_thread(encode, inputs, self.policy, Role.ACTIVATIONS),
                int(inputs.shape[0]),
                local.weights_digest_of(step),
            )
            while len(self._own_work) > MAX_OWN_WORK:
                self._own_work.popitem(last=False)
        return out

    def _receipt(
        self,
        peer: PeerID,
        req: ForwardRequest | BackwardRequest,
        kind: str,
        outputs: list[bytes],
        num_samples: int,
        ack: bytes,
        weights: bytes = b"",
    ) -> None:
        if self.collector is None or not ack:
            return
        inputs = (
            [req.inputs] if isinstance(req, ForwardRequest) else [req.inputs, req.grad_outputs or req.targets or b""]
        )
        self.collector.record(
            server=peer,
            step=req.step,
            stage=req.stage,
            microbatch_id=req.microbatch_id,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            num_samples=num_samples,
            ack=ack,
            weights=weights,
        )

    def _local(self, peer: PeerID, stage: int) -> StageServer | None:
        server = self.local_server()
        if peer == self.transport.peer_id and server is not None and server.index == stage:
            return server
        return None

    async def forward(
        self, peer: PeerID, *, stage: int, step: int, microbatch_id: str, inputs: torch.Tensor
    ) -> torch.Tensor:
        local = self._local(peer, stage)
        if local is not None:
            return await self._local_forward(local, stage=stage, step=step, microbatch_id=microbatch_id, inputs=inputs)
        req = ForwardRequest(
            run_id=self.run_id,
            stage=stage,
            step=step,
            microbatch_id=microbatch_id,
            inputs=await asyncio.to_thread(encode, inputs, self.policy, Role.ACTIVATIONS),
        )
        req = self._attach_upstream(peer, req)
        reply = await self.transport.call(peer, "stage.forward", req, ForwardReply, timeout_s=self.rpc_timeout_s)
        outputs = decode(reply.outputs, f"outputs of stage {stage} from {peer.short()}", dtype=self.activation_dtype)
        self._receipt(peer, req, "forward", [reply.outputs], int(inputs.shape[0]), reply.ack, reply.weights)
        return outputs

    async def backward(
        self,
        peer: PeerID,
        *,
        stage: int,
        step: int,
        microbatch_id: str,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, float | None]:
        local = self._local(peer, stage)
        if local is not None:
            if targets is not None:
                loss, grad = await asyncio.to_thread(
                    local.loss_backward, inputs, targets, step=step, microbatch_id=microbatch_id
                )
                return grad, loss
            if grad_outputs is None:
                raise SwarmError("backward needs grad_outputs or targets")
            grad = await asyncio.to_thread(local.backward, inputs, grad_outputs, step=step, microbatch_id=microbatch_id)
            return grad, None
        req = BackwardRequest(
            run_id=self.run_id,
            stage=stage,
            step=step,
            microbatch_id=microbatch_id,
            inputs=await asyncio.to_thread(encode, inputs, self.policy, Role.ACTIVATIONS),
            grad_outputs=None
            if grad_outputs is None
            else await asyncio.to_thread(encode, grad_outputs, self.policy, Role.ACTIVATION_GRADS),
            targets=None if targets is None else encode(targets, self.policy, Role.ACTIVATIONS),
        )
        req = self._attach_upstream(peer, req)
        reply = await self.transport.call(peer, "stage.backward", req, BackwardReply, timeout_s=self.rpc_timeout_s)
        grad = (
            None
            if reply.grad_inputs is None
            else decode(reply.grad_inputs, f"grad_inputs from {peer.short()}", dtype=self.activation_dtype)
        )
        if stage > 0 and grad is None:
            raise ProtocolError(f"{peer.short()} answered stage {stage} backward without grad_inputs")
        outputs = [] if reply.grad_inputs is None else [reply.grad_inputs]
        self._receipt(peer, req, "backward", outputs, int(inputs.shape[0]), reply.ack, reply.weights)
        return grad, reply.loss
