"""The storage attacks of issue 13 against a real ``swarm-node start --role dht`` process on loopback.

Used by tests/dht/test_storage_flood.py (scaled down) and runnable on its own for the full-size figures:

    python tests/dht/flood_attack.py --records 10000 --identities 50 --per-identity 200

Each attack talks the DHT wire protocol directly (raw STOREs, as a malicious peer would, no client-side checks);
the node's RSS is read with psutil after each phase. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from swarm.dht import DHT, DHTConfig, owner_subkey
from swarm.dht.messages import NodeInfo, StoreReply, StoreRequest
from swarm.dht.records import Record, make_record
from swarm.errors import SwarmError
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.p2p.messages import Message

NODE_CMD = [
    sys.executable,
    "-c",
    "from swarm.cli.node import main; main()",
    "start",
    "--role",
    "dht",
    "--log-level",
    "ERROR",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
]
VALUE_BYTES = 60 * 1024
BATCH = 64  # records per STORE (the default max_records_per_store)
TTL_S = 6 * 86400.0
MIB = 1024 * 1024


def identity(i: int, salt: str = "flood") -> Identity:
    return Identity.from_seed(hashlib.sha256(f"{salt}:{i}".encode()).digest())


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    maddr: str

    def rss_mib(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / MIB


@contextlib.contextmanager
def node_process(data_dir: Path, timeout_s: float = 60.0) -> Iterator[NodeProcess]:
    """A DHT-only node process; killed on exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*NODE_CMD, "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = ""
        while not line.startswith("listening on ") and time.monotonic() < deadline:
            line = proc.stdout.readline()  # printed as soon as the node listens
            if not line and proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            raise RuntimeError(f"the node did not start: {line!r}")
        yield NodeProcess(proc, line.split()[-1])
    finally:
        proc.kill()
        proc.wait(timeout=timeout_s)


@contextlib.asynccontextmanager
async def attacker(ident: Identity) -> AsyncIterator[Transport]:
    async with Transport(ident, TransportConfig(listen_maddrs=(), idle_timeout_s=30.0)) as t:
        yield t


async def send(t: Transport, maddr: str, records: list[Record]) -> int:
    """One raw STORE; how many records the node stored (0 if it refused the request)."""
    try:
        reply = await t.call(maddr, "dht.store", StoreRequest(records=tuple(records)), StoreReply, timeout_s=30.0)
    except SwarmError:
        return 0
    return sum(reply.stored)


@dataclass(frozen=True, kw_only=True)
class CacheFlagStore(Message):
    """A STORE that asks the receiver to cache (the field the sender could set before issue 13)."""

    sender: NodeInfo | None = None
    records: tuple[Record, ...]
    cache: bool = True


async def send_cache_flag(t: Transport, maddr: str, records: list[Record]) -> int:
    try:
        reply = await t.call(maddr, "dht.store", CacheFlagStore(records=tuple(records)), StoreReply, timeout_s=30.0)
    except SwarmError:
        return 0
    return sum(reply.stored)


def junk(prefix: str, i: int, value: bytes, subkey: Any = None) -> Record:
    return make_record(f"{prefix}/{i}" if subkey is None else prefix, value, time.time() + TTL_S, subkey)


async def flood_one_identity(node: NodeProcess, records: int, value: bytes, *, cache: bool = False) -> dict[str, Any]:
    """One identity stores ``records`` records of 60 KB under distinct keys (with the cache flag set if asked)."""
    stored = 0
    start = time.monotonic()
    prefix, how = ("cached", send_cache_flag) if cache else ("flood", send)
    async with attacker(identity(0)) as t:
        for first in range(0, records, BATCH):
            batch = [junk(prefix, i, value) for i in range(first, min(records, first + BATCH))]
            stored += await how(t, node.maddr, batch)
    return {"sent": records, "stored": stored, "seconds": round(time.monotonic() - start, 2)}


async def flood_many_identities(node: NodeProcess, identities: int, per_identity: int, value: bytes) -> dict[str, Any]:
    """``identities`` fresh identities from this one IP store ``per_identity`` 60 KB records each."""
    stored = 0
    for n in range(identities):
        async with attacker(identity(1000 + n)) as t:
            for first in range(0, per_identity, BATCH):
                batch = [junk(f"sybil{n}", i, value) for i in range(first, min(per_identity, first + BATCH))]
                stored += await send(t, node.maddr, batch)
    return {"sent": identities * per_identity, "stored": stored}


async def client_get(node: NodeProcess, key: str) -> Any:
    cfg = DHTConfig(
        initial_peers=(node.maddr,),
        client_mode=True,
        transport=TransportConfig(listen_maddrs=()),
        maintenance_interval_s=3600.0,
    )
    async with DHT.create(cfg, identity=identity(9999)) as dht:
        found = await dht.get(key, latest=True)
    if found is None or not isinstance(found, dict):
        return None if found is None else found.value
    return {k: v.value for k, v in found.items()}


async def junk_subkeys(node: NodeProcess, count: int, value: bytes) -> dict[str, Any]:
    """The owner stores its subkey of ``jsk/peers``; ``count`` 60 KB junk subkeys (from 8 identities) follow;
    a client then gets the key."""
    owner = identity(7777)
    key = "jsk/board"
    async with attacker(owner) as t:
        rec = make_record(key, "owner", time.time() + 600, owner_subkey(owner.peer_id), identity=owner)
        owner_stored = await send(t, node.maddr, [rec])
    stored = 0
    for n in range(8):
        async with attacker(identity(5000 + n)) as t:
            mine = range(n, count, 8)
            for first in range(0, len(mine), BATCH):
                stored += await send(t, node.maddr, [junk(key, 0, value, f"j{i}") for i in mine[first : first + BATCH]])
    got = await client_get(node, key)
    owner_seen = isinstance(got, dict) and got.get(owner_subkey(owner.peer_id)) == "owner"
    return {"owner_stored": owner_stored, "junk_stored": stored, "get_ok": got is not None, "owner_seen": owner_seen}


async def plain_over_dictionary(node: NodeProcess) -> dict[str, Any]:
    """An owner-signed subkey, then one unsigned plain value with a 6-day expiration on the same key."""
    # not a `{run}/peers` key: that one has a schema (PeerRecord values) that refuses these values before storage
    owner = identity(8888)
    key = "pod/board"
    async with attacker(owner) as t:
        rec = make_record(key, "owner", time.time() + 600, owner_subkey(owner.peer_id), identity=owner)
        await send(t, node.maddr, [rec])
    async with attacker(identity(8889)) as t:
        plain_stored = await send(t, node.maddr, [make_record(key, "x", time.time() + TTL_S)])
    got = await client_get(node, key)
    return {"plain_stored": plain_stored, "got": "plain" if got == "x" else "dictionary" if got else None}


async def run_phase(node: NodeProcess, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """One attack against ``node``, with the node's RSS before and after."""
    value = os.urandom(VALUE_BYTES)
    rss_before = node.rss_mib()
    if phase == "plain_over_dictionary":
        figures = await plain_over_dictionary(node)
    elif phase == "junk_subkeys":
        figures = await junk_subkeys(node, args.junk_subkeys, value)
    elif phase == "one_identity":
        figures = await flood_one_identity(node, args.records, value)
    elif phase == "cache_flag":
        figures = await flood_one_identity(node, args.records, value, cache=True)
    else:
        figures = await flood_many_identities(node, args.identities, args.per_identity, value)
    return {**figures, "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(node.rss_mib(), 1)}


PHASES = ("plain_over_dictionary", "junk_subkeys", "one_identity", "cache_flag", "many_identities")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--identities", type=int, default=50)
    parser.add_argument("--per-identity", type=int, default=200)
    parser.add_argument("--junk-subkeys", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/flood-node"))
    args = parser.parse_args()
    figures = {}
    for phase in PHASES:  # each against a fresh node process
        with node_process(args.data_dir / phase) as node:
            figures[phase] = asyncio.run(run_phase(node, phase, args))
        print(phase, figures[phase], flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
