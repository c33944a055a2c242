"""Fixtures for transport tests: transports on 127.0.0.1 with deterministic identities, always stopped."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from swarm.p2p.identity import Identity
from swarm.p2p.messages import Message
from swarm.p2p import Transport, TransportConfig

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@dataclass(frozen=True, kw_only=True)
class Echo(Message):
    text: str = ""
    number: int = 0


def seeded_identity(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


MakeTransport = Callable[..., Awaitable[Transport]]


@pytest.fixture
async def make_transport() -> AsyncIterator[MakeTransport]:
    started: list[Transport] = []
    counter = 0

    async def make(name: str | None = None, **overrides: object) -> Transport:
        nonlocal counter
        counter += 1
        overrides.setdefault("listen_maddrs", LOOPBACK)
        transport = Transport(seeded_identity(name or f"peer-{counter}"), TransportConfig(**overrides))  # type: ignore[arg-type]
        await transport.start()
        started.append(transport)
        return transport

    yield make
    for transport in reversed(started):
        await transport.stop()
