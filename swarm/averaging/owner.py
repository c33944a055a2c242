"""The owner's side of a butterfly all-reduce round: the agreed group and its spans, the round's state, and
:class:`AllReduceServer`, which serves ``avg.part`` (reduce each sender's parts of this member's span as they
arrive, dropping a sender that stalls longer than ``part_timeout_s``, sends garbage, or breaks its stream) and
``avg.result`` (stream each reduced part back). The members' side is `swarm.averaging.allreduce`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from swarm.averaging.config import AveragerConfig
from swarm.averaging.messages import MemberInfo, PartAck, PartHeader, ResultHeader, ResultRequest
from swarm.averaging.partition import span_bounds, span_sizes
from swarm.averaging.reducer import SpanReducer
from swarm.averaging.wire import PartCodec
from swarm.errors import SwarmError
from swarm.p2p import RpcContext, Transport
from swarm.p2p.identity import PeerID

if TYPE_CHECKING:
    from swarm.averaging.mirrored import MirrorInbox

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Group:
    """An agreed group: the same key, round id and ordered members on every member; ``my_index`` is ours."""

    group_key: str
    round_id: bytes
    members: tuple[MemberInfo, ...]
    my_index: int

    def peer(self, index: int) -> PeerID:
        return PeerID(self.members[index].peer_id)

    def index_of(self, peer_id: PeerID) -> int | None:
        raw = peer_id.to_bytes()
        return next((i for i, m in enumerate(self.members) if m.peer_id == raw), None)

    def spans(self, total_numel: int) -> list[tuple[int, int]]:
        sizes = span_sizes(total_numel, [m.bandwidth for m in self.members], [m.client_mode for m in self.members])
        return span_bounds(sizes)


@dataclass(kw_only=True)
class RoundState:
    """The owner's side of one round: our span's reducer and who has fetched its result."""

    group: Group
    span_parts: list[tuple[int, int]]
    reducer: SpanReducer | None
    started: set[int] = field(default_factory=set)
    finished_fetch: set[int] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    encoded: dict[int, tuple[tuple[Any, ...], int]] = field(default_factory=dict)  # part -> (message, fetches left)
    excluded: set[int] = field(default_factory=set)  # members whose parts this owner refuses (gradient checks)
    served: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # lossy codecs: each result part as sent
    mirror: MirrorInbox | None = None  # a mirrored round (two members, `swarm.averaging.mirrored`): the peer's vector

    def fetches_settled(self) -> bool:
        others = set(range(len(self.group.members))) - {self.group.my_index}
        failed = self.reducer.failed if self.reducer is not None else set()
        return others <= (self.finished_fetch | failed)


@dataclass(frozen=True, kw_only=True)
class InspectedPart:
    """One part of the span this peer reduced, for gradient checks: what each member sent for the values
    ``[start, end)`` of the flat tensor, and the reduced center (mean or CenteredClip)."""

    start: int
    end: int
    values: dict[PeerID, torch.Tensor]
    center: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class AllReduceOutcome:
    """What happened in one exchange: owners whose span we could not (fully) get, senders the owner dropped."""

    lost_owners: tuple[PeerID, ...]
    dropped_senders: tuple[PeerID, ...]
    inspected: tuple[InspectedPart, ...] = ()
    excluded: tuple[PeerID, ...] = ()


class AllReduceServer:
    """Serves ``avg.part`` and ``avg.result`` for the rounds this peer takes part in."""

    def __init__(self, config: AveragerConfig, transport: Transport, codec: PartCodec) -> None:
        self.config = config
        self.transport = transport
        self.codec = codec
        self._rounds: dict[tuple[str, bytes], RoundState] = {}
        self._expected: dict[tuple[str, bytes], asyncio.Event] = {}
        self._forming: set[str] = set()  # group keys our matchmaker is still forming a group under
        self._agreed = asyncio.Event()  # set (and replaced) whenever a round is expected or a key stops forming
        self._kept: set[asyncio.Task[None]] = set()  # work a round leaves behind (a mirrored upload's ack)

    def register(self) -> None:
        self.transport.register_stream("avg.part", PartHeader, self.rpc_part)
        self.transport.register_stream("avg.result", ResultRequest, self.rpc_result)

    def unregister(self) -> None:
        for method in ("avg.part", "avg.result"):
            self.transport.unregister(method)
        for task in self._kept:
            task.cancel()

    def keep(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task this server owns: it may outlive the round that started it, and `unregister`
        cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._kept.add(task)
        task.add_done_callback(self._kept.discard)
        return task

    def expect(self, group_key: str, round_id: bytes) -> None:
        """A round we agreed to: requests for it wait (up to ``join_timeout_s``) until it opens."""
        self._expected.setdefault((group_key, round_id), asyncio.Event())
        self._wake()

    def forming(self, group_key: str, active: bool) -> None:
        """Our matchmaker is (``active``) or is no longer forming a group under ``group_key``.

        While it is, a request for an unknown round under that key waits (up to ``join_timeout_s``) for our own
        ``avg.begin``: the leader sends the membership to all followers at once, so a follower that got it first
        may already stream to us before ours arrived. Once the key is no longer forming, unknown rounds fail.
        """
        if active:
            self._forming.add(group_key)
        else:
            self._forming.discard(group_key)
        self._wake()

    def _wake(self) -> None:
        self._agreed.set()
        self._agreed = asyncio.Event()

    def open(self, state: RoundState) -> None:
        key = (state.group.group_key, state.group.round_id)
        self._rounds[key] = state
        self._expected.setdefault(key, asyncio.Event()).set()

    def close(self, state: RoundState) -> None:
        key = (state.group.group_key, state.group.round_id)
        self._rounds.pop(key, None)
        self._expected.pop(key, None)

    async def _round_for(self, ctx: RpcContext, group_key: str, round_id: bytes) -> tuple[RoundState, int]:
        key = (group_key, round_id)
        try:
            async with asyncio.timeout(self.config.join_timeout_s):
                event = self._expected.get(key)
                while event is None and group_key in self._forming:  # our begin may still be on its way
                    await self._agreed.wait()
                    event = self._expected.get(key)
                if event is None:
                    raise SwarmError(f"no averaging round {round_id.hex()[:8]} under {group_key!r} here; not a member")
                await event.wait()
        except TimeoutError:
            raise SwarmError(
                f"averaging round {round_id.hex()[:8]} under {group_key!r} did not start here within "
                f"{self.config.join_timeout_s:.1f}s"
            ) from None
        state = self._rounds.get(key)
        if state is None:
            raise SwarmError(f"averaging round {round_id.hex()[:8]} under {group_key!r} is already over")
        sender = state.group.index_of(ctx.peer_id)
        if sender is None or sender == state.group.my_index:
            raise SwarmError(f"{ctx.peer_id.short()} is not a member of round {round_id.hex()[:8]}")
        return state, sender

    async def rpc_part(self, ctx: RpcContext, header: PartHeader, chunks: AsyncIterator[bytes]) -> tuple[PartAck, None]:
        """Take a sender's parts of our span, one chunk per part; drop the sender on stall, garbage or break."""
        state, sender = await self._round_for(ctx, header.group_key, header.round_id)
        if state.mirror is not None:
            self._start_sending(state, sender, ctx)
            return await state.mirror.receive(self.codec, self.config.part_timeout_s, header, chunks), None
        reducer = state.reducer
        if reducer is None:
            raise SwarmError("this peer owns no span in the round (client mode or empty span)")
        self._start_sending(state, sender, ctx)
        received, why = 0, "the stream was cancelled (connection lost)"
        try:
            for index, (start, end) in enumerate(state.span_parts):
                async with asyncio.timeout(self.config.part_timeout_s):
                    data = await anext(chunks)
                values = await codec_call(self.codec, self.codec.decode, data, end - start)
                reducer.add(sender, index, values, header.weight)  # may be a view of data: the reducer copies
                received += 1
                await reducer.finish_ready()
            async with asyncio.timeout(self.config.part_timeout_s):
                async for _ in chunks:
                    raise SwarmError("more chunks than parts in the span")
            why = ""
        except (SwarmError, TimeoutError, StopAsyncIteration) as e:
            why = f"{type(e).__name__}: {e}"
            raise SwarmError(f"part stream dropped after {received} parts: {why}") from None
        finally:
            if why:  # garbage, stall, broken stream or cancelled handler: the parts still missing go without it
                log.warning(
                    "%s: dropping sender %s after %d parts in round %s: %s",
                    self.transport.peer_id.short(),
                    ctx.peer_id.short(),
                    received,
                    header.round_id.hex()[:8],
                    why,
                )
                reducer.fail(sender)
                state.changed.set()  # the round's own task reduces the parts this completes
        return PartAck(parts_received=received), None

    @staticmethod
    def _start_sending(state: RoundState, sender: int, ctx: RpcContext) -> None:
        """SwarmError unless ``sender`` may send its parts now (not excluded, first time this round)."""
        if sender in state.excluded:
            raise SwarmError(
                f"{ctx.peer_id.short()} is left out of this peer's span: its gradient parts failed "
                "this peer's gradient checks (outlier or replayed)"
            )
        if sender in state.started:
            raise SwarmError(f"{ctx.peer_id.short()} opened avg.part twice in one round")
        state.started.add(sender)
        state.changed.set()

    async def rpc_result(
        self, ctx: RpcContext, request: ResultRequest, chunks: AsyncIterator[bytes]
    ) -> tuple[ResultHeader, AsyncIterator[bytes | tuple[Any, ...]]]:
        """Stream our reduced span back, one part per chunk as soon as it is reduced (empty: no result)."""
        state, sender = await self._round_for(ctx, request.group_key, request.round_id)
        if state.reducer is None:
            raise SwarmError("this peer owns no span in the round (client mode or empty span)")
        return ResultHeader(num_parts=len(state.span_parts)), self._results(state, sender)

    async def _results(self, state: RoundState, sender: int) -> AsyncIterator[bytes | tuple[Any, ...]]:
        reducer = state.reducer
        if reducer is None:
            raise SwarmError("internal: a result stream for a round without a reducer")
        try:
            for index in range(len(state.span_parts)):
                values = await reducer.wait_part(index)
                if values is None:
                    yield b""
                    continue
                if index not in state.encoded:  # encode each result part once for all fetchers
                    data = await codec_call(self.codec, self.codec.encode, values)
                    state.encoded.setdefault(index, (data, len(state.group.members) - 1))
                    if not self.codec.inline:  # a lossy codec: the owner keeps the values the others decode
                        state.served.setdefault(index, data)
                data, left = state.encoded[index]
                if left <= 1:
                    del state.encoded[index]
                else:
                    state.encoded[index] = (data, left - 1)
                yield data
        finally:
            state.finished_fetch.add(sender)
            state.changed.set()


async def codec_call(codec: PartCodec, fn: Callable[..., T], *args: Any) -> T:
    """Run a codec function on the loop when the codec is a plain copy, else in a worker thread."""
    if codec.inline:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
