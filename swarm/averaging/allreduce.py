"""Butterfly all-reduce of one flat vector among an agreed, ordered group, over ``avg.part`` / ``avg.result``.

Every member owns one span (see :mod:`swarm.averaging.partition`). A member streams each owner its slice of that
owner's span, one part per chunk (``avg.part``), and at the same time fetches the owner's reduced span, one
part per chunk, as soon as each part is reduced (``avg.result``). Results are written into the member's flat
vector in place; a part that never arrives (owner gone) keeps the member's own values. The owner's side lives
in :class:`AllReduceServer` (`swarm.averaging.owner`): it reduces parts from all senders as they arrive and drops
a sender that stalls longer than ``part_timeout_s``, sends garbage, or breaks its stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Collection
from typing import Any, TypeVar

import torch

from swarm.p2p.identity import PeerID
from swarm.averaging.mirrored import is_mirrored, run_mirrored
from swarm.averaging.messages import PartAck, PartHeader, ResultHeader, ResultRequest
from swarm.averaging.partition import part_bounds, part_numel
from swarm.averaging.reducer import SpanReducer
from swarm.averaging.owner import (
    AllReduceOutcome,
    AllReduceServer,
    Group,
    InspectedPart,
    RoundState,
    codec_call,
)
from swarm.errors import SwarmError

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["AllReduceOutcome", "AllReduceServer", "Group", "InspectedPart", "RoundState", "run_allreduce"]


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
    if is_mirrored(group):  # two members: each sends the other everything, half a round trip
        return await run_mirrored(server, group, flat, weight, exclude)
    cfg = server.config
    deadline = asyncio.get_running_loop().time() + cfg.allreduce_timeout_s
    spans = group.spans(flat.numel())
    excluded = {j for j in range(len(group.members)) if j != group.my_index and group.peer(j) in exclude}
    state = _open_round(server, group, flat, weight, spans, excluded)
    done: dict[int, bool] = {}
    try:
        await _exchange_spans(server, state, flat, spans, weight, deadline, done)
    finally:
        server.close(state)
    await _apply_own_span(server, state, flat, spans[group.my_index][0])
    return _outcome(state, spans, done)


def _open_round(
    server: AllReduceServer,
    group: Group,
    flat: torch.Tensor,
    weight: float,
    spans: list[tuple[int, int]],
    excluded: set[int],
) -> RoundState:
    """The round's state, opened on ``server``: the parts of this peer's span and their reducer, seeded with
    this peer's own values (excluded members already failed)."""
    my_start, my_end = spans[group.my_index]
    my_parts = part_bounds(my_end - my_start, part_numel(server.config.part_size_bytes))
    reducer = None
    if my_parts:
        reducer = SpanReducer(
            span_numel=my_end - my_start,
            parts=my_parts,
            senders=range(len(group.members)),
            config=server.config.reduction_config(),
        )
        for index, (start, end) in enumerate(my_parts):
            reducer.add(group.my_index, index, flat[my_start + start : my_start + end], weight)
        for j in excluded:
            reducer.fail(j)
    state = RoundState(group=group, span_parts=my_parts, reducer=reducer, excluded=excluded)
    server.open(state)
    return state


async def _exchange_spans(
    server: AllReduceServer,
    state: RoundState,
    flat: torch.Tensor,
    spans: list[tuple[int, int]],
    weight: float,
    deadline: float,
    done: dict[int, bool],
) -> None:
    """Send every other owner our parts of its span (or decline an excluded one) and serve our own span, until
    all settle or the deadline passes (then unfinished spans keep local values)."""
    cfg, group = server.config, state.group
    numel_per_part = part_numel(cfg.part_size_bytes)
    try:
        async with asyncio.timeout_at(deadline):
            async with asyncio.TaskGroup() as tg:
                for j, (start, end) in enumerate(spans):
                    if j == group.my_index or end <= start:
                        continue
                    if j in state.excluded:  # an excluded owner's span keeps our values; tell it now
                        tg.create_task(_decline(server, group, j, weight, deadline))
                    else:
                        parts = part_bounds(end - start, numel_per_part)
                        tg.create_task(_exchange(server, group, j, flat[start:end], parts, weight, deadline, done))
                if state.reducer is not None:
                    tg.create_task(_serve_until_settled(state, cfg.part_timeout_s))
    except TimeoutError:
        log.warning(
            "%s: averaging round %s hit its %.1fs deadline; unfinished spans keep local values",
            server.transport.peer_id.short(),
            group.round_id.hex()[:8],
            cfg.allreduce_timeout_s,
        )


async def _apply_own_span(server: AllReduceServer, state: RoundState, flat: torch.Tensor, my_start: int) -> None:
    """Write the reduced parts of this peer's span into ``flat``: the values the other members decoded where a
    part was served to them (so replicas stay bit-identical), else the exact reduction."""
    reducer = state.reducer
    if reducer is None:
        return
    for index, (start, end) in enumerate(state.span_parts):
        if not reducer.has_result(index):
            continue
        values = await reducer.wait_part(index)
        if values is None:
            continue
        out, served = flat[my_start + start : my_start + end], state.served.get(index)
        if served is None:
            out.copy_(values)
        else:  # keep what the other members decoded, not the exact values: replicas stay bit-identical
            await codec_call(server.codec, server.codec.decode_into, b"".join(served), out)


def _outcome(state: RoundState, spans: list[tuple[int, int]], done: dict[int, bool]) -> AllReduceOutcome:
    """Who was lost (owners whose span never came back), who was dropped, and what the reducer inspected."""
    group, reducer, excluded, me = state.group, state.reducer, state.excluded, state.group.my_index
    lost = tuple(
        group.peer(j)
        for j, (s, e) in enumerate(spans)
        if j != me and e > s and j not in excluded and not done.get(j, False)
    )
    if reducer is None:
        return AllReduceOutcome(
            lost_owners=lost, dropped_senders=(), inspected=(), excluded=tuple(group.peer(j) for j in sorted(excluded))
        )
    my_start = spans[me][0]
    inspected = tuple(
        InspectedPart(
            start=my_start + state.span_parts[i][0],
            end=my_start + state.span_parts[i][1],
            values={group.peer(s): v for s, v in sorted(values.items())},
            center=center,
        )
        for i, (values, center) in sorted(reducer.inspected.items())
    )
    return AllReduceOutcome(
        lost_owners=lost,
        dropped_senders=tuple(group.peer(i) for i in sorted(reducer.failed - excluded)),
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
            yield await codec_call(codec, codec.encode, span[start:end])

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
                    await codec_call(codec, codec.decode_into, data, span[start:end])
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
