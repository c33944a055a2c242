"""Helpers of the averaging tests: seeded identities and real loopback transports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import torch

from swarm.p2p.identity import Identity
from swarm.p2p.maddr import parse_maddr
from swarm.p2p import Transport, TransportConfig
from swarm.averaging.allreduce import Group
from swarm.averaging.messages import MemberInfo, round_id_of


def identity(i: int, salt: int = 0) -> Identity:
    return Identity.from_seed(bytes([i + 1, salt]) * 16)


@contextlib.asynccontextmanager
async def transports(n: int, *, salt: int = 0) -> AsyncIterator[list[Transport]]:
    """``n`` started loopback transports that know each other's addresses; all stopped on exit."""
    cfg = TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=5.0)
    async with contextlib.AsyncExitStack() as stack:
        ts = [await stack.enter_async_context(Transport(identity(i, salt), cfg)) for i in range(n)]
        for t in ts:
            for other in ts:
                if other is not t:
                    t.add_addresses(other.peer_id, [parse_maddr(m) for m in other.listen_maddrs])
        yield ts


def fixed_groups(
    ts: Sequence[Transport],
    key: str,
    *,
    weights: Sequence[float] | None = None,
    bandwidths: Sequence[float | None] | None = None,
    client_mode: Sequence[bool] | None = None,
) -> list[Group]:
    """The group every member would get from matchmaking, built directly (for exchange-only tests)."""
    n = len(ts)
    members = tuple(
        MemberInfo(
            peer_id=t.peer_id.to_bytes(),
            maddrs=tuple(t.listen_maddrs),
            ready_at=float(i),
            weight=(weights[i] if weights else 1.0),
            bandwidth=(bandwidths[i] if bandwidths else None),
            client_mode=(client_mode[i] if client_mode else False),
        )
        for i, t in enumerate(ts)
    )
    rid = round_id_of(key, members)
    return [Group(group_key=key, round_id=rid, members=members, my_index=i) for i in range(n)]


def random_tensors(seed: int, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def weighted_mean(flats: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The float64 reference: the weighted mean of flat tensors."""
    return sum(w * f.double() for w, f in zip(weights, flats, strict=False)) / sum(weights)
