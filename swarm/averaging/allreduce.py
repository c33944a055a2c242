"""Butterfly all-reduce of one flat vector among an agreed, ordered group, over ``avg.part`` / ``avg.result``.

Every member owns one span (see :mod:`swarm.averaging.partition`). A member streams each owner its slice of that
owner's span, one part per chunk (``avg.part``), and at the same time fetches the owner's reduced span, one
part per chunk, as soon as each part is reduced (``avg.result``). Results are written into the member's flat
vector in place; a part that never arrives (owner gone) keeps the member's own values. The owner's side lives
in :class:`AllReduceServer`: it reduces parts from all senders as they arrive and drops a sender that stalls
longer than ``part_timeout_s``, sends garbage, or breaks its stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from swarm.p2p.identity import PeerID
from swarm.p2p import RpcContext, Transport
from swarm.averaging.config import AveragerConfig
from swarm.averaging.messages import MemberInfo, PartAck, PartHeader, ResultHeader, ResultRequest
from swarm.averaging.partition import part_bounds, part_numel, span_bounds, span_sizes
from swarm.averaging.reducer import SpanReducer
from swarm.averaging.wire import PartCodec
from swarm.errors import SwarmError

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

    def register(self) -> None:
        self.transport.register_stream("avg.part", PartHeader, self.rpc_part)
        self.transport.register_stream("avg.result", ResultRequest, self.rpc_result)

    def unregister(self) -> None:
        for method in ("avg.part", "avg.result"):
            self.transport.unregister(method)

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
        reducer = state.reducer
        if reducer is None:
            raise SwarmError("this peer owns no span in the round (client mode or empty span)")
        if sender in state.excluded:
            raise SwarmError(
                f"{ctx.peer_id.short()} is left out of this peer's span: its gradient parts failed "
                "this peer's gradient checks (outlier or replayed)"
            )
        if sender in state.started:
            raise SwarmError(f"{ctx.peer_id.short()} opened avg.part twice in one round")
        state.started.add(sender)
        state.changed.set()
        received, why = 0, "the stream was cancelled (connection lost)"
        try:
            for index, (start, end) in enumerate(state.span_parts):
                async with asyncio.timeout(self.config.part_timeout_s):
                    data = await anext(chunks)
                values = await _codec_call(self.codec, self.codec.decode, data, end - start)
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
                    data = await _codec_call(self.codec, self.codec.encode, values)
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


async def run_allreduce(
    server: AllReduceServer,
    group: Group,
    flat: torch.Tensor,
    weight: float,
    exclude: Collection[PeerID] = (),
) -> AllReduceOutcome:
    """Average ``flat`` (1-D float32) with ``group`` in place; returns who was lost. Never raises on peer faults.

    Bounded by ``allreduce_timeout_s``: at the deadline, spans and parts not yet received keep our own values.
    Members in ``exclude`` (found cheating by this peer's gradient checks) are left out of the span this peer
    reduces: their ``avg.part`` is refused; they may still fetch the result.
    """
    cfg = server.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.allreduce_timeout_s
    spans = group.spans(flat.numel())
    numel_per_part = part_numel(cfg.part_size_bytes)
    me = group.my_index
    my_start, my_end = spans[me]
    my_parts = part_bounds(my_end - my_start, numel_per_part)
    reducer = None
    if my_parts:
        senders = range(len(group.members))
        reducer = SpanReducer(
            span_numel=my_end - my_start, parts=my_parts, senders=senders, config=cfg.reduction_config()
        )
        for index, (start, end) in enumerate(my_parts):
            reducer.add(me, index, flat[my_start + start : my_start + end], weight)
    excluded = {j for j in range(len(group.members)) if j != me and group.peer(j) in exclude}
    if reducer is not None:
        for j in excluded:
            reducer.fail(j)
    state = RoundState(group=group, span_parts=my_parts, reducer=reducer, excluded=excluded)
    server.open(state)
    done: dict[int, bool] = {}
    try:
        async with asyncio.timeout_at(deadline):
            async with asyncio.TaskGroup() as tg:
                for j, (start, end) in enumerate(spans):
                    if j == me or end <= start:
                        continue
                    if j in excluded:  # an excluded owner's span keeps our values; tell it now
                        tg.create_task(_decline(server, group, j, weight, deadline))
                    else:
                        parts = part_bounds(end - start, numel_per_part)
                        tg.create_task(_exchange(server, group, j, flat[start:end], parts, weight, deadline, done))
                if reducer is not None:
                    tg.create_task(_serve_until_settled(state, cfg.part_timeout_s))
    except TimeoutError:
        log.warning(
            "%s: averaging round %s hit its %.1fs deadline; unfinished spans keep local values",
            server.transport.peer_id.short(),
            group.round_id.hex()[:8],
            cfg.allreduce_timeout_s,
        )
    finally:
        server.close(state)
    if reducer is not None:
        for index, (start, end) in enumerate(my_parts):
            if reducer.has_result(index):
                values = await reducer.wait_part(index)
                if values is None:
                    continue
                out, served = flat[my_start + start : my_start + end], state.served.get(index)
                if served is None:
                    out.copy_(values)
                else:  # keep what the other members decoded, not the exact values: replicas stay bit-identical
                    await _codec_call(server.codec, server.codec.decode_into, b"".join(served), out)
    lost = tuple(
        group.peer(j)
        for j, (s, e) in enumerate(spans)
        if j != me and e > s and j not in excluded and not done.get(j, False)
    )
    dropped = tuple(group.peer(i) for i in sorted(reducer.failed - excluded)) if reducer is not None else ()
    inspected = (
        ()
        if reducer is None
        else tuple(
            InspectedPart(
                start=my_start + my_parts[i][0],
                end=my_start + my_parts[i][1],
                values={group.peer(s): v for s, v in sorted(values.items())},
                center=center,
            )
            for i, (values, center) in sorted(reducer.inspected.items())
        )
    )
    return AllReduceOutcome(
        lost_owners=lost,
        dropped_senders=dropped,
        inspected=inspected,
        excluded=tuple(group.peer(j) for j in sorted(excluded)),
    )


async def _serve_until_settled(state: RoundState, part_timeout_s: float) -> None:
    """Drop senders that never open their stream in time, reduce what is complete, wait for all fetches."""
    reducer = state.reducer
    if reducer is None:
        return
    await reducer.finish_ready()
    try:
        async with asyncio.timeout(part_timeout_s):
            while not (state.started | reducer.failed) >= (reducer.expected - {state.group.my_index}):
                state.changed.clear()
                await state.changed.wait()
                await reducer.finish_ready()
    except TimeoutError:
        for sender in reducer.expected - state.started - reducer.failed - {state.group.my_index}:
            log.warning(
                "round %s: sender %s never sent its parts; dropped",
                state.group.round_id.hex()[:8],
                state.group.peer(sender).short(),
            )
            reducer.fail(sender)
    await reducer.finish_ready()
    while not state.fetches_settled():
        state.changed.clear()
        await state.changed.wait()
        await reducer.finish_ready()


async def _exchange(
    server: AllReduceServer,
    group: Group,
    owner: int,
    span: torch.Tensor,
    parts: list[tuple[int, int]],
    weight: float,
    deadline: float,
    done: dict[int, bool],
) -> None:
    """Send ``owner`` our slice of its span and write its reduced parts into ``span``; faults only log."""
    codec, transport = server.codec, server.transport
    peer = group.peer(owner)
    loop = asyncio.get_running_loop()

    async def encoded_parts() -> AsyncIterator[tuple[Any, ...]]:
        # 'none' yields views of `span`; each is encrypted (copied) as soon as the stream has credit. The owner's
        # result for a part lands in `span` only after it has our part, so an unsent view never sees it change.
        for start, end in parts:
            yield await _codec_call(codec, codec.encode, span[start:end])

    async def upload() -> None:
        header = PartHeader(group_key=group.group_key, round_id=group.round_id, weight=weight)
        async with transport.open_stream(
            peer, "avg.part", header, PartAck, chunks=encoded_parts(), timeout_s=max(0.1, deadline - loop.time())
        ) as stream:
            if stream.reply.parts_received != len(parts):
                raise SwarmError(f"owner took {stream.reply.parts_received} of {len(parts)} parts")

    async def download() -> int:
        request = ResultRequest(group_key=group.group_key, round_id=group.round_id)
        received = 0
        async with transport.open_stream(
            peer, "avg.result", request, ResultHeader, timeout_s=max(0.1, deadline - loop.time())
        ) as stream:
            if stream.reply.num_parts != len(parts):
                raise SwarmError(f"owner announced {stream.reply.num_parts} parts, expected {len(parts)}")
            chunks = stream.chunks()
            while True:
                # an owner may wait part_timeout_s for a stalled sender before it reduces a part without it
                async with asyncio.timeout(2 * server.config.part_timeout_s):
                    data = await anext(chunks, None)
                if data is None:
                    break
                if received >= len(parts):
                    raise SwarmError("owner sent more parts than its span has")
                start, end = parts[received]
                if data:  # decode_into leaves our values in place if the part is bad
                    await _codec_call(codec, codec.decode_into, data, span[start:end])
                received += 1
        return received

    async with asyncio.TaskGroup() as tg:
        tg.create_task(_logged(upload(), "upload to", peer, server))
        down = tg.create_task(_logged(download(), "download from", peer, server))
    done[owner] = down.result() == len(parts)


async def _decline(server: AllReduceServer, group: Group, owner: int, weight: float, deadline: float) -> None:
    """Open ``avg.part`` to an owner we exclude and end it with no parts: the owner drops us at once instead of
    waiting ``part_timeout_s`` for parts that will never come (and so stalling every member's round)."""
    peer = group.peer(owner)
    header = PartHeader(group_key=group.group_key, round_id=group.round_id, weight=weight)
    timeout_s = min(server.config.part_timeout_s, max(0.1, deadline - asyncio.get_running_loop().time()))
    try:
        async with server.transport.open_stream(
            peer, "avg.part", header, PartAck, chunks=_no_chunks(), timeout_s=timeout_s
        ):
            pass
    except (SwarmError, OSError) as e:  # the owner answers the empty stream with an error: that is the point
        log.debug("%s: declined to send parts to %s (excluded): %s", server.transport.peer_id.short(), peer.short(), e)


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


async def _logged(coro: Awaitable[T], what: str, peer: PeerID, server: AllReduceServer) -> T | None:
    """Await ``coro``; a peer fault (SwarmError, OSError) is logged and becomes None instead of raising."""
    try:
        return await coro
    except (SwarmError, OSError) as e:
        log.warning(
            "%s: averaging %s %s failed: %s",
            server.transport.peer_id.short(),
            what,
            peer.short(),
            e or type(e).__name__,
        )
        return None


async def _codec_call(codec: PartCodec, fn: Callable[..., T], *args: Any) -> T:
    """Run a codec function on the loop when the codec is a plain copy, else in a worker thread."""
    if codec.inline:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
