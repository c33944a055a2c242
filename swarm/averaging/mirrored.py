"""The all-reduce of a two-member group in half a round trip: each member sends the other its whole vector.

In a butterfly round of two, each member sends the owner of the other half its slice (``avg.part``) and fetches
that half reduced (``avg.result``): a full round trip, with each member uploading its whole vector's worth of
bytes. A mirrored round moves the same bytes in one direction only: each member streams its whole vector to the
other (``avg.part``, one part per chunk, as to an owner of everything) and reduces both vectors itself. Both
members reduce the same two inputs in the same order (the group's member order, with multiplications and additions
that are not fused), so they end with the same bits; with a lossy codec each member's own input is its encoded
vector decoded again, exactly what the other received. The round ends for a member once it holds the other's
vector and has handed its own to the connection: half a round trip after both are ready, instead of one.

Faults stay consistent where they can: a member whose upload failed before the round ended leaves its own vector
out, as its peer must (both then hold the peer's vector); a peer whose vector did not arrive (gone, stalled past
``part_timeout_s``, garbage, excluded by this member's gradient checks) is left out and reported lost. The upload's
acknowledgement is not waited for: it arrives half a round trip later, in a task this server owns
(`AllReduceServer.keep`); if it then reports a failure, the two members may hold different values, which the next
step's digest vote settles (`swarm.averaging.digests`), and it is logged.

Used by `swarm.averaging.allreduce.run_allreduce` for every group of exactly two members, neither in client mode
(both compute that from the same agreed group).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.averaging.messages import PartAck, PartHeader
from swarm.averaging.owner import AllReduceOutcome, AllReduceServer, Group, InspectedPart, RoundState, codec_call
from swarm.averaging.wire import PartCodec
from swarm.averaging.partition import part_bounds, part_numel
from swarm.averaging.reducer import ReductionConfig, centered_clip
from swarm.errors import SwarmError
from swarm.p2p.identity import PeerID

log = logging.getLogger(__name__)


def is_mirrored(group: Group) -> bool:
    """Whether ``group`` averages by a mirrored round: exactly two members, neither in client mode."""
    return len(group.members) == 2 and not any(m.client_mode for m in group.members)


@dataclass(kw_only=True)
class MirrorInbox:
    """The peer's whole vector as it arrives in a mirrored round (`RoundState.mirror`): its decoded parts, its
    weight, and whether all of it came."""

    parts: list[tuple[int, int]]
    values: list[torch.Tensor] = field(default_factory=list)
    weight: float = 0.0
    complete: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the peer opened its stream
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    async def receive(
        self, codec: PartCodec, part_timeout_s: float, header: PartHeader, chunks: AsyncIterator[bytes]
    ) -> PartAck:
        """``avg.part`` in a mirrored round: take the peer's vector, one part per chunk; SwarmError (the inbox then
        settles without it) on a stall, garbage, too many chunks or a broken stream."""
        self.started.set()
        try:
            for start, end in self.parts:
                async with asyncio.timeout(part_timeout_s):
                    data = await anext(chunks)
                values = await codec_call(codec, codec.decode, data, end - start)
                self.values.append(values.clone())  # decode may return a view of the chunk
            async with asyncio.timeout(part_timeout_s):
                async for _ in chunks:
                    raise SwarmError("more chunks than parts in the vector")
            self.weight, self.complete = header.weight, True
        except (SwarmError, TimeoutError, StopAsyncIteration) as e:
            why = f"{type(e).__name__}: {e}"
            raise SwarmError(f"mirrored part stream dropped after {len(self.values)} parts: {why}") from None
        finally:
            if not self.complete:
                self.values.clear()
            self.settled.set()
        return PartAck(parts_received=len(self.values))


class _Upload:
    """This member's side of a mirrored round: stream the whole vector to the peer, keeping what the peer decodes
    of it (``own``: views of the vector with a plain-copy codec, decoded copies with a lossy one)."""

    def __init__(
        self, server: AllReduceServer, group: Group, flat: torch.Tensor, parts: list[tuple[int, int]], weight: float
    ) -> None:
        self.server, self.group, self.flat, self.parts, self.weight = server, group, flat, parts, weight
        self.peer = group.peer(1 - group.my_index)
        self.own: list[torch.Tensor] = []
        self.handed_over = False  # every part was taken by the connection (the vector may change now)
        self.failed = False
        self.settled = asyncio.Event()  # handed over, or failed

    async def _chunks(self) -> AsyncIterator[tuple[Any, ...]]:
        codec = self.server.codec
        for start, end in self.parts:
            values = self.flat[start:end]
            data = await codec_call(codec, codec.encode, values)
            if codec.inline:
                self.own.append(values)
            else:
                decoded = await codec_call(codec, codec.decode, b"".join(data), end - start)
                self.own.append(decoded.clone())
            yield data
        self.handed_over = True
        self.settled.set()

    async def run(self, deadline: float) -> None:
        """Send the vector and wait for the peer's acknowledgement (owned by the server: it may end after the
        round); faults only log."""
        me, loop = self.server.transport.peer_id.short(), asyncio.get_running_loop()
        header = PartHeader(group_key=self.group.group_key, round_id=self.group.round_id, weight=self.weight)
        try:
            async with self.server.transport.open_stream(
                self.peer,
                "avg.part",
                header,
                PartAck,
                chunks=self._chunks(),
                timeout_s=max(0.1, deadline - loop.time()),
            ) as stream:
                if stream.reply.parts_received != len(self.parts):
                    raise SwarmError(f"the peer took {stream.reply.parts_received} of {len(self.parts)} parts")
        except (SwarmError, OSError) as e:
            self.failed = True
            after = " after the round ended (the two may differ until the next digest vote)" if self.handed_over else ""
            log.warning("%s: mirrored upload to %s failed%s: %s", me, self.peer.short(), after, e or type(e).__name__)
        finally:
            self.settled.set()


async def run_mirrored(
    server: AllReduceServer, group: Group, flat: torch.Tensor, weight: float, exclude: Collection[PeerID] = ()
) -> AllReduceOutcome:
    """Average ``flat`` in place with the other member of a two-member ``group`` (module docstring). Never raises
    on peer faults; bounded by ``allreduce_timeout_s``."""
    cfg = server.config
    peer = group.peer(1 - group.my_index)
    parts = part_bounds(flat.numel(), part_numel(cfg.part_size_bytes))
    excluded = {1 - group.my_index} if peer in exclude else set()
    inbox = MirrorInbox(parts=parts)
    if excluded:  # its avg.part is refused (`AllReduceServer.rpc_part`); ours still goes, so it can use ours
        inbox.settled.set()
    state = RoundState(group=group, span_parts=parts, reducer=None, excluded=excluded, mirror=inbox)
    upload = _Upload(server, group, flat, parts, weight)
    server.open(state)
    sending = None
    try:
        deadline = asyncio.get_running_loop().time() + cfg.allreduce_timeout_s
        sending = server.keep(upload.run(deadline))
        async with asyncio.timeout_at(deadline):
            await _wait_inbox(server, group, inbox)
            await upload.settled.wait()
    except TimeoutError:
        log.warning(
            "%s: mirrored round %s hit its %.1fs deadline; what did not arrive is left out",
            server.transport.peer_id.short(),
            group.round_id.hex()[:8],
            cfg.allreduce_timeout_s,
        )
    finally:
        server.close(state)
        if sending is not None and not upload.handed_over:  # it may still read the vector we are about to write
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    mine = upload.own if upload.handed_over and not upload.failed else None
    theirs = inbox.values if inbox.complete else None
    entries = [(group.my_index, weight, mine), (1 - group.my_index, inbox.weight, theirs)]
    inspected = await asyncio.to_thread(_reduce_into, group, flat, parts, entries, cfg.reduction_config())
    return AllReduceOutcome(
        lost_owners=(peer,) if mine is None else (),  # the peer's result leaves our vector out
        dropped_senders=(peer,) if theirs is None and not excluded else (),
        inspected=inspected,
        excluded=tuple(group.peer(j) for j in excluded),
    )


async def _wait_inbox(server: AllReduceServer, group: Group, inbox: MirrorInbox) -> None:
    """Until the peer's vector settled; a peer that does not open its stream within ``part_timeout_s`` is left
    out (as an owner drops a sender that never starts)."""
    try:
        async with asyncio.timeout(server.config.part_timeout_s):
            await inbox.started.wait()
    except TimeoutError:
        if not inbox.settled.is_set():
            log.warning(
                "%s: round %s: %s never sent its vector; left out",
                server.transport.peer_id.short(),
                group.round_id.hex()[:8],
                group.peer(1 - group.my_index).short(),
            )
            inbox.settled.set()
    await inbox.settled.wait()


_Entry = tuple[int, float, list[torch.Tensor] | None]  # member index, weight, its parts (None: left out)


def _reduce_into(
    group: Group, flat: torch.Tensor, parts: list[tuple[int, int]], entries: list[_Entry], config: ReductionConfig
) -> tuple[InspectedPart, ...]:
    """Write the reduction of the present entries into ``flat``, part by part, in member order (the same bits on
    both members); returns the inspected parts (``inspect_parts``: every member's values, members of >= 1 sample).
    With no entry present ``flat`` keeps its values."""
    present = sorted((j, w, v) for j, w, v in entries if v is not None)
    if not present:
        return ()
    inspected = []
    for i, (start, end) in enumerate(parts):
        values = [v[i] for _, _, v in present]
        weights = [w for _, w, _ in present]
        out = reduce_pair(values, weights, config)
        if i < config.inspect_parts:
            kept = {group.peer(j): v[i].clone() for j, w, v in present if w >= 1.0}
            if kept:
                inspected.append(InspectedPart(start=start, end=end, values=kept, center=out.clone()))
        flat[start:end].copy_(out)
    return tuple(inspected)


def reduce_pair(values: list[torch.Tensor], weights: list[float], config: ReductionConfig) -> torch.Tensor:
    """The weighted mean (or CenteredClip) of ``values`` in the given order, without fused operations, so that two
    members reducing the same inputs get the same bits; one value is returned as it is."""
    if len(values) == 1:
        return values[0].clone()
    if config.reduction == "centered_clip":
        center = centered_clip(values, weights, tau=config.clip_tau, iterations=config.clip_iterations)
        return center.to(torch.float32)
    acc = torch.mul(values[0], weights[0])
    for v, w in zip(values[1:], weights[1:], strict=True):
        acc.add_(torch.mul(v, w))
    return acc.div_(sum(weights))
