"""The tied embedding/head across machines: stage 0 and the last stage add each other's gradient of it.

In one process the token embedding (stage 0) and the output head (last stage) are one Parameter, whose gradient
is the sum of both uses. Across machines each of the two stages holds the matrix (``StageModel.tied_name``).
After a step's within-stage average, each server keeps its averaged gradient of the matrix for that step
(`TiedStore`) and fetches the other stage's with ``stage.tied``; both then set the sum
``stage-0 part + last-stage part`` (the same order on both sides, so the same bits) and apply the same optimizer
update, so the two copies stay equal. If the other part cannot be fetched in time, the stage applies its own part
only and logs it: the copies then drift apart until the next re-tie step (below).

One peer's answer is not trusted alone when others can be asked: a stage asks two peers of the other stage at
once and takes the value they agree on; if they differ it asks a third (``MAX_ANSWERS``) and combines the answers
with a coordinate-wise median (`robust_combine`), so one peer that sends a bad gradient (sign-flipped, scaled,
stale) moves no value outside the range of the honest answers. Honest peers of one stage hold the same averaged
gradient, bit for bit with a lossless all-reduce codec, so two equal answers end the exchange and the median of
answers with an identical majority is that value exactly: both stages still add the same bits.

A peer that fails is replaced by the next one at once, and one more is asked after ``hedge_s`` without a
decision, so a slow or stuck peer costs ``hedge_s``, not ``rpc_timeout_s``. An answer no other peer confirms
within ``hedge_s`` is used alone (the other stage has one live peer). A server already past a step whose gradient
it never kept (it downloaded a peer's state, or jumped) answers with an error at once instead of waiting.

In local_sgd mode (run config ``[averaging]``) there is no exchange per step: each stage trains its copy on its
own part, and at each outer sync both stages set the sum of their outer updates on the mean of their copies at the
last sync (`TiedService.exchange_outer`).

Re-tying: a failed exchange leaves the two copies different, and so would a step where the stages combined
differing answers. Every ``retie_every_steps`` steps (run config, ``[pipeline]``) each side also fetches the other
stage's copy of the matrix as it was before the step's update (a second ``stage.tied`` call, ``what="weight"``),
and both set ``(stage-0 copy + last-stage copy) / 2`` together with the update (`TiedOutcome.replace`, for
``StageServer.apply_step``): the copies are equal again (a no-op, bit for bit, when they already were).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from swarm.compression import CodecPolicy, get_codec, serialize_tensor
from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message
from swarm.p2p import RpcContext, Transport
from swarm.errors import SwarmError
from swarm.model.stages import StageInputError
from swarm.training.stage_rpc import decode
from swarm.training.stage_server import StageServer

log = logging.getLogger(__name__)

_Agreed = tuple[torch.Tensor, torch.Tensor | None] | None  # the other stage's gradient (and matrix), if any answered

KEPT_STEPS = 8
WAIT_STEP_S = 0.01
HEDGE_S = 2.0
MAX_ANSWERS = 3  # a median of 3 outvotes one bad answer


@dataclass(frozen=True, kw_only=True)
class TiedRequest(Message):
    """``stage.tied``: of the answering peer's ``stage`` at ``step``, the averaged gradient of the tied matrix
    (``what="grad"``) or, on re-tie steps, the matrix before the step's update (``what="weight"``): one tensor per
    reply, so each fits the transport's message limit as the gradient alone does."""

    run_id: str
    stage: int
    step: int
    what: str = "grad"

    def __post_init__(self) -> None:
        if self.what not in ("grad", "weight"):
            raise ValueError(f"what must be 'grad' or 'weight', got {self.what!r}")


@dataclass(frozen=True, kw_only=True)
class TiedReply(Message):
    """The tensor a `TiedRequest` asked for (``serialize_tensor`` with the ``none`` codec: exact bits)."""

    tensor: bytes


class TiedStore:
    """This node's averaged tied-matrix gradients of its last few steps (with the matrix itself on re-tie steps);
    the handler waits for a missing step."""

    def __init__(self) -> None:
        self._grads: OrderedDict[int, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._changed = asyncio.Event()

    def put(self, step: int, grad: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        self._grads[step] = (grad.detach().clone(), weight)
        while len(self._grads) > KEPT_STEPS:
            self._grads.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()

    def has(self, step: int) -> bool:
        return step in self._grads

    async def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradient (and matrix, on re-tie steps) of ``step``, waiting for it (the caller bounds the wait)."""
        while step not in self._grads:
            if self._grads and step < next(iter(self._grads)):
                raise StageInputError(
                    f"the tied gradient of step {step} is no longer kept (oldest: {next(iter(self._grads))})"
                )
            await self._changed.wait()
        return self._grads[step]


def tied_index(server: StageServer) -> int | None:
    """The position of the tied matrix in ``server.parameters()`` (None if this stage has none)."""
    name = server.model.tied_name
    if name is None:
        return None
    target = dict(server.model.named_parameters())[name]
    return next(i for i, p in enumerate(server.parameters()) if p is target)


class TiedService:
    """Serves ``stage.tied`` from a `TiedStore`, and combines this stage's part with the other stage's."""

    def __init__(
        self,
        transport: Transport,
        policy: CodecPolicy,
        *,
        run_id: str,
        num_stages: int,
        server_of: Callable[[], StageServer | None],
        rpc_timeout_s: float,
        hedge_s: float = HEDGE_S,
        retie_every_steps: int = 0,
        lag_steps: int = 0,
    ) -> None:
        self.transport = transport
        self.lag_steps = lag_steps  # steps a server may be past a step before it keeps that step's part (delayed)
        self.retie_every_steps = retie_every_steps
        self.hedge_s = hedge_s
        self.policy = policy
        self.run_id = run_id
        self.num_stages = num_stages
        self.server_of = server_of
        self.rpc_timeout_s = rpc_timeout_s
        self.store = TiedStore()

    def register(self) -> None:
        self.transport.register("stage.tied", TiedRequest, self.rpc_tied)

    def unregister(self) -> None:
        self.transport.unregister("stage.tied")

    async def rpc_tied(self, ctx: RpcContext, req: TiedRequest) -> TiedReply:
        server = self.server_of()
        if req.run_id != self.run_id or server is None or server.index != req.stage or tied_index(server) is None:
            raise StageInputError(f"this node does not hold the tied matrix of stage {req.stage} of run {req.run_id!r}")
        # it was put before the step advanced (with delayed updates, within one step after), or never
        if server.step > req.step + self.lag_steps and not self.store.has(req.step):
            raise StageInputError(
                f"stage {server.index} is at step {server.step} and has no tied gradient of step "
                f"{req.step} (it skipped or downloaded that step); ask another peer"
            )
        grad, weight = await self.store.get(req.step)
        tensor = grad if req.what == "grad" else weight
        if tensor is None:
            raise StageInputError(f"step {req.step} is not a re-tie step here: no tied matrix kept for it")
        return TiedReply(tensor=await asyncio.to_thread(serialize_tensor, tensor, get_codec("none")))

    @contextlib.asynccontextmanager
    async def prefetch(
        self, server: StageServer, step: int, grads: list[torch.Tensor], other_peers: Sequence[PeerID]
    ) -> AsyncIterator[asyncio.Task[_Agreed] | None]:
        """Ask the other stage for its part of ``step`` at once, while this stage still averages (its peers answer
        when their own average is done): the answer comes half a round trip after theirs instead of a round trip
        after ours. Yields the fetch for `combine` (None: this stage holds no tied matrix); cancelled on exit."""
        index = tied_index(server)
        if index is None or self.num_stages == 1:
            yield None
            return
        task = asyncio.create_task(self._agreed_answer(*self._request(server, step, other_peers), grads[index]))
        try:
            yield task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _request(
        self, server: StageServer, step: int, other_peers: Sequence[PeerID]
    ) -> tuple[list[PeerID], TiedRequest, bool]:
        other_stage = self.num_stages - 1 if server.index == 0 else 0
        request = TiedRequest(run_id=self.run_id, stage=other_stage, step=step)
        peers = [p for p in other_peers if p != self.transport.peer_id]  # a stale view may still list us there
        retie = self.retie_every_steps > 0 and step % self.retie_every_steps == 0
        return peers, request, retie

    async def combine(
        self,
        server: StageServer,
        step: int,
        grads: list[torch.Tensor],
        other_peers: Sequence[PeerID],
        early: asyncio.Task[_Agreed] | None = None,
    ) -> TiedOutcome:
        """Replace this stage's part of the tied gradient in ``grads`` by the sum of both parts (``early``: the fetch
        `prefetch` started; asked again now if it found no answer).

        On a re-tie step whose copies differ, the outcome's ``replace`` holds the mean of both copies, for
        ``StageServer.apply_step(..., replace=...)`` to set together with the update.
        """
        index = tied_index(server)
        if index is None or self.num_stages == 1:
            return TiedOutcome(combined=True)
        mine = grads[index]
        peers, request, retie = self._request(server, step, other_peers)
        other_stage = request.stage
        my_weight = await asyncio.to_thread(server.parameter_copy, index) if retie else None
        self.store.put(step, mine, my_weight)
        answer = await early if early is not None else None
        if answer is None:
            answer = await self._agreed_answer(peers, request, retie, mine)
        if answer is None:
            log.warning(
                "%s: no peer of stage %d sent its tied gradient of step %d; applying this stage's part only",
                self.transport.peer_id.short(),
                other_stage,
                step,
            )
            return TiedOutcome(combined=False)
        theirs, their_weight = answer
        first, last = (mine, theirs) if server.index == 0 else (theirs, mine)
        grads[index] = first + last
        if my_weight is not None and their_weight is not None:
            drift = float((my_weight - their_weight).abs().max())
            if drift > 0:
                log.info(
                    "%s: re-tying the tied matrix with stage %d at step %d (the copies differed by up to %.3g)",
                    self.transport.peer_id.short(),
                    other_stage,
                    step,
                    drift,
                )
                return TiedOutcome(combined=True, replace={index: (my_weight + their_weight) * 0.5})  # commutative
        return TiedOutcome(combined=True)

    async def exchange_outer(
        self, server: StageServer, step: int, update: torch.Tensor, anchor: torch.Tensor, other_peers: Sequence[PeerID]
    ) -> torch.Tensor | None:
        """local_sgd, at an outer sync (`swarm.training.outer_sync`): the tied matrix both stages set, from this
        stage's outer ``update`` of it and its copy at the last sync (``anchor``) and the other stage's pair, as
        ``update_0 + update_last + (anchor_0 + anchor_last) / 2`` (the same bits on both sides; the anchors' mean
        re-ties copies a failed exchange left apart). None: no peer of the other stage answered (logged)."""
        other_stage = self.num_stages - 1 if server.index == 0 else 0
        self.store.put(step, update, anchor.detach().clone())
        request = TiedRequest(run_id=self.run_id, stage=other_stage, step=step)
        peers = [p for p in other_peers if p != self.transport.peer_id]
        answer = await self._agreed_answer(peers, request, True, update)
        if answer is None or answer[1] is None:
            log.warning(
                "%s: no agreed tied update of stage %d at outer sync step %d; this stage keeps its own copy",
                self.transport.peer_id.short(),
                other_stage,
                step,
            )
            return None
        theirs, their_anchor = answer[0], answer[1]
        mine_pair, their_pair = (update, anchor), (theirs, their_anchor)
        (u_first, a_first), (u_last, a_last) = (mine_pair, their_pair) if server.index == 0 else (their_pair, mine_pair)
        return (u_first + u_last) + (a_first + a_last) * 0.5

    async def _agreed_answer(
        self, peers: Sequence[PeerID], request: TiedRequest, with_weight: bool, mine: torch.Tensor
    ) -> _Agreed:
        """The other stage's gradient (and matrix, ``with_weight``) as ``peers`` agree on it (`robust_combine` of
        up to ``MAX_ANSWERS``); None if none answers. Two equal answers settle it; differing ones call for a third."""
        queue, answers = list(peers), list[_Answer]()
        pending: set[asyncio.Task[_Answer | None]] = set()
        try:
            while not _settled(answers):
                wanted = (2 if len(answers) < 2 else MAX_ANSWERS) - len(answers)
                while queue and len(pending) < wanted:
                    pending.add(asyncio.create_task(self._fetch(queue.pop(0), request, mine, with_weight)))
                if not pending:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=self.hedge_s if queue or answers else None, return_when=asyncio.FIRST_COMPLETED
                )
                answers += [answer for task in done if (answer := task.result()) is not None]
                if not done and queue:  # nobody answered within hedge_s: ask one more
                    pending.add(asyncio.create_task(self._fetch(queue.pop(0), request, mine, with_weight)))
                elif not done:  # the answers in hand are all that came within hedge_s
                    break
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if not answers:
            return None
        if len(answers) > 1 and not _settled(answers[:2]):
            log.warning(
                "%s: peers %s sent differing tied gradients of step %d; using their coordinate-wise median",
                self.transport.peer_id.short(),
                ", ".join(a.peer.short() for a in answers),
                request.step,
            )
        grad = robust_combine([a.grad for a in answers])
        weights = [a.weight for a in answers if a.weight is not None]
        if not with_weight or len(weights) != len(answers):
            return grad, None
        if len(weights) == 2 and not torch.equal(weights[0], weights[1]):
            # zero is a neutral gradient but not a neutral matrix: with two differing copies, do not re-tie
            log.warning(
                "%s: two peers sent differing tied matrices at re-tie step %d; not re-tying this step",
                self.transport.peer_id.short(),
                request.step,
            )
            return grad, None
        return grad, robust_combine(weights)

    async def _fetch(self, peer: PeerID, request: TiedRequest, mine: torch.Tensor, with_weight: bool) -> _Answer | None:
        """``peer``'s tied gradient (and matrix, ``with_weight``) of the request's step, or None (logged)."""
        try:
            if not with_weight:
                return _Answer(peer=peer, grad=await self._call(peer, request, mine), weight=None)
            # a re-tie step: both asked at once (each waits on the peer for the same step), not one after the other
            grad = asyncio.ensure_future(self._call(peer, request, mine))
            try:
                weight = await self._call(peer, replace(request, what="weight"), mine)
                return _Answer(peer=peer, grad=await grad, weight=weight)
            finally:
                grad.cancel()
                await asyncio.gather(grad, return_exceptions=True)
        except (SwarmError, TimeoutError, OSError) as e:
            log.warning(
                "%s: tied gradient of step %d from %s failed: %s",
                self.transport.peer_id.short(),
                request.step,
                peer.short(),
                e,
            )
            return None

    async def _call(self, peer: PeerID, request: TiedRequest, mine: torch.Tensor) -> torch.Tensor:
        """One ``stage.tied`` call: the tensor, checked against the shape and dtype of ``mine``."""
        reply = await self.transport.call(peer, "stage.tied", request, TiedReply, timeout_s=self.rpc_timeout_s)
        what = "gradient" if request.what == "grad" else "matrix"
        tensor = decode(reply.tensor, f"tied {what} from {peer.short()}", dtype=mine.dtype)
        if tensor.shape != mine.shape:
            raise StageInputError(f"tied {what} of shape {list(tensor.shape)}, expected {list(mine.shape)}")
        return tensor


@dataclass(frozen=True)
class TiedOutcome:
    """``combined``: the other stage's part was added; ``replace``: parameters to set with the update (re-tie)."""

    combined: bool
    replace: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Answer:
    peer: PeerID
    grad: torch.Tensor
    weight: torch.Tensor | None

    def same(self, other: _Answer) -> bool:
        """Bit for bit the same gradient (and matrix)."""
        if not torch.equal(self.grad, other.grad):
            return False
        if self.weight is None or other.weight is None:
            return self.weight is other.weight
        return torch.equal(self.weight, other.weight)


def _settled(answers: Sequence[_Answer]) -> bool:
    """Enough answers to decide: two that are bit for bit equal, or ``MAX_ANSWERS``."""
    if len(answers) >= MAX_ANSWERS:
        return True
    return any(a.same(b) for i, a in enumerate(answers) for b in answers[i + 1 :])


def robust_combine(answers: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median of ``answers``, with a zero added to an even count.

    One answer is returned as is. With two, each value is the one of smaller magnitude if both have its sign,
    else 0: never larger than, nor opposite to, the honest one's. With three, one bad answer cannot move a value
    outside the range of the other two. An identical majority gives exactly its value (the same bits).
    """
    if len(answers) == 1:
        return answers[0]
    values = list(answers) + ([torch.zeros_like(answers[0])] if len(answers) % 2 == 0 else [])
    return torch.stack(values).median(dim=0).values
