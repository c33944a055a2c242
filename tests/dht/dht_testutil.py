"""Helpers for the DHT tests: deterministic identities and a settable clock."""

from __future__ import annotations

import hashlib

from swarm.p2p.identity import Identity


def make_identity(i: int, salt: str = "dht-test") -> Identity:
    """A deterministic identity number ``i``."""
    return Identity.from_seed(hashlib.sha256(f"{salt}:{i}".encode()).digest())


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = 1_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from typing import Any  # noqa: E402

from swarm.dht import DHT, DHTConfig  # noqa: E402
from swarm.p2p import TransportConfig  # noqa: E402

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def dht_config(**overrides: Any) -> DHTConfig:
    """A DHT config for tests: loopback, short idle timeout, no background maintenance unless asked."""
    base: dict[str, Any] = dict(
        transport=TransportConfig(listen_maddrs=LOOPBACK, idle_timeout_s=5.0),
        rpc_timeout_s=2.0,
        lookup_timeout_s=4.0,
        maintenance_interval_s=3600.0,
    )
    base.update(overrides)
    return DHTConfig(**base)


class Swarm:
    """N DHT nodes in this process; each joins through a random earlier node (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[DHT] = []
        self.rng = random.Random(seed)
        self._next_identity = 1000 * seed

    async def add(self, config: DHTConfig | None = None, **overrides: Any) -> DHT:
        config = config or dht_config(**overrides)
        alive = [n for n in self.nodes if n.protocol.running and not n.config.client_mode]
        if alive and not config.initial_peers:
            config = dataclasses.replace(config, initial_peers=(self.rng.choice(alive).listen_maddrs[0],))
        self._next_identity += 1
        node = DHT.create(config, identity=make_identity(self._next_identity))
        await node.start()
        self.nodes.append(node)
        return node

    def alive(self) -> list[DHT]:
        return [n for n in self.nodes if n._protocol is not None and n.protocol.running]

    async def stop_all(self) -> None:
        for node in self.nodes:
            await node.shutdown()


@contextlib.asynccontextmanager
async def swarm(n: int, *, seed: int = 0, **overrides: Any) -> AsyncIterator[Swarm]:
    """A started swarm of ``n`` nodes, stopped on exit."""
    s = Swarm(seed)
    try:
        for _ in range(n):
            await s.add(**overrides)
        yield s
    finally:
        await s.stop_all()


async def wait_until(predicate: Any, timeout_s: float = 5.0, poll_s: float = 0.02) -> None:
    """Poll ``predicate()`` until true; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(poll_s)
