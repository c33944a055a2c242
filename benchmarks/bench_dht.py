"""DHT benchmark: our Kademlia (N = 32 and N = 256) against hivemind's DHT and PyPI `kademlia` (N = 32).

Workload, the same for every system: start N nodes on loopback (each joins through a random running
node), 200 stores from random nodes, then 200 gets of those keys from random nodes; 10% of the nodes are
stopped during the run (half after 100 stores, half after 100 gets). Reports success rates,
p50/p95/p99 latencies, memory per node (RSS growth of the benchmark process / N; for hivemind, the RSS of
each DHT process plus its p2pd daemon) and time to start the swarm. Each system and size runs in a fresh
process, so memory figures do not mix. The last line is one JSON object with the ratios ours / others for
N = 32.

    python benchmarks/bench_dht.py [--sizes 32,256] [--no-hivemind] [--no-kademlia]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

NUM_OPS = 200
CHURN_FRACTION = 0.10
TTL_S = 600.0


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    if not samples_s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    q = statistics.quantiles(samples_s, n=100, method="inclusive") if len(samples_s) > 1 else samples_s * 99
    return {"p50_ms": round(q[49] * 1e3, 2), "p95_ms": round(q[94] * 1e3, 2), "p99_ms": round(q[98] * 1e3, 2)}


class Workload:
    """Runs the store/get/churn workload against a system given as callables."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)

    async def run(
        self,
        store: Callable[[int, str, Any], Awaitable[bool]],
        get: Callable[[int, str], Awaitable[Any]],
        stop: Callable[[int], Awaitable[None]],
    ) -> dict[str, Any]:
        alive = list(range(self.n))
        to_stop = self.rng.sample(range(1, self.n), max(1, round(self.n * CHURN_FRACTION)))
        half = len(to_stop) // 2
        store_lat, get_lat, stored_ok, got_ok = [], [], 0, 0
        for i in range(NUM_OPS):
            if i == NUM_OPS // 2:
                for node in to_stop[:half]:
                    await stop(node)
                    alive.remove(node)
            start = time.perf_counter()
            ok = await store(self.rng.choice(alive), f"bench/{i}", {"i": i, "pad": "x" * 64})
            store_lat.append(time.perf_counter() - start)
            stored_ok += bool(ok)
        for i in range(NUM_OPS):
            if i == NUM_OPS // 2:
                for node in to_stop[half:]:
                    await stop(node)
                    alive.remove(node)
            key_index = self.rng.randrange(NUM_OPS)
            start = time.perf_counter()
            value = await get(self.rng.choice(alive), f"bench/{key_index}")
            get_lat.append(time.perf_counter() - start)
            got_ok += value == {"i": key_index, "pad": "x" * 64}
        return {
            "store_success": stored_ok / NUM_OPS,
            "get_success": got_ok / NUM_OPS,
            "store": _percentiles(store_lat),
            "get": _percentiles(get_lat),
            "stopped_nodes": len(to_stop),
        }


async def bench_ours(n: int, seed: int) -> dict[str, Any]:
    from swarm.dht import DHT, DHTConfig
    from swarm.p2p import TransportConfig

    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    rng = random.Random(seed)
    transport = TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), idle_timeout_s=10.0)
    nodes: list[DHT] = []
    started = time.perf_counter()
    try:
        for _ in range(n):
            peers = (rng.choice(nodes).listen_maddrs[0],) if nodes else ()
            node = DHT.create(DHTConfig(initial_peers=peers, transport=transport))
            await node.start()
            nodes.append(node)
        start_s = time.perf_counter() - started

        async def store(i: int, key: str, value: Any) -> bool:
            return await nodes[i].store(key, value, time.time() + TTL_S)

        remote_lat: list[float] = []

        async def get(i: int, key: str) -> Any:
            start = time.perf_counter()
            found = await nodes[i].get(key)
            if nodes[i].last_lookup is not None:  # this node did not hold the key: a network lookup
                remote_lat.append(time.perf_counter() - start)
            return None if found is None else found.value

        async def stop(i: int) -> None:
            await nodes[i].shutdown()

        result = await Workload(n, seed).run(store, get, stop)
        result["get_from_network"] = {"count": len(remote_lat), **_percentiles(remote_lat)}
        rss_after = psutil.Process().memory_info().rss
    finally:
        for node in nodes:
            await node.shutdown()
    return {
        "system": "swarm",
        "n": n,
        "start_s": round(start_s, 2),
        "memory_per_node_mb": round((rss_after - rss_before) / n / 1e6, 2),
        **result,
    }


async def bench_kademlia(n: int, seed: int) -> dict[str, Any]:
    from kademlia.network import Server

    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    rng = random.Random(seed)
    servers: list[Server] = []
    ports: list[int] = []
    started = time.perf_counter()
    try:
        for _ in range(n):
            server = Server()
            await server.listen(0, interface="127.0.0.1")
            port = server.transport.get_extra_info("sockname")[1]
            if ports:
                await server.bootstrap([("127.0.0.1", rng.choice(ports))])
            servers.append(server)
            ports.append(port)
        start_s = time.perf_counter() - started

        async def store(i: int, key: str, value: Any) -> bool:
            return bool(await servers[i].set(key, json.dumps(value, sort_keys=True)))

        async def get(i: int, key: str) -> Any:
            found = await servers[i].get(key)
            return None if found is None else json.loads(found)

        async def stop(i: int) -> None:
            servers[i].stop()

        result = await Workload(n, seed).run(store, get, stop)
        rss_after = psutil.Process().memory_info().rss
    finally:
        for server in servers:
            server.stop()
    return {
        "system": "kademlia",
        "n": n,
        "start_s": round(start_s, 2),
        "memory_per_node_mb": round((rss_after - rss_before) / n / 1e6, 2),
        **result,
    }


def _tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


async def bench_hivemind(n: int, seed: int) -> dict[str, Any]:
    import hivemind
    from hivemind.utils import get_dht_time

    rng = random.Random(seed)
    dhts: list[Any] = []
    started = time.perf_counter()
    try:
        for _ in range(n):
            peers = [str(m) for m in rng.choice(dhts).get_visible_maddrs()] if dhts else []
            dhts.append(hivemind.DHT(start=True, initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        start_s = time.perf_counter() - started
        memory = sum(_tree_rss(d.pid) for d in dhts) / n

        async def store(i: int, key: str, value: Any) -> bool:
            return bool(await asyncio.to_thread(dhts[i].store, key, value, get_dht_time() + TTL_S))

        async def get(i: int, key: str) -> Any:
            found = await asyncio.to_thread(dhts[i].get, key)
            return None if found is None else found.value

        async def stop(i: int) -> None:
            await asyncio.to_thread(dhts[i].shutdown)

        result = await Workload(n, seed).run(store, get, stop)
    finally:
        for d in dhts:
            if d.is_alive():
                d.shutdown()
    return {
        "system": "hivemind",
        "n": n,
        "start_s": round(start_s, 2),
        "memory_per_node_mb": round(memory / 1e6, 2),
        **result,
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _run_isolated(system: str, n: int, seed: int) -> dict[str, Any]:
    """Run one system's workload in a fresh process (clean memory figures); its last stdout line is JSON."""
    cmd = [sys.executable, __file__, "--one", f"{system}:{n}", "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"system": system, "n": n, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


_RUNNERS = {"swarm": bench_ours, "kademlia": bench_kademlia, "hivemind": bench_hivemind}


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    if "error" in ours or "error" in theirs:
        return {"error": "a run failed"}
    return {
        "get_p50": _ratio(ours["get"]["p50_ms"], theirs["get"]["p50_ms"]),
        "get_from_network_p50": _ratio(ours["get_from_network"]["p50_ms"], theirs["get"]["p50_ms"]),
        "store_p50": _ratio(ours["store"]["p50_ms"], theirs["store"]["p50_ms"]),
        "memory_per_node": _ratio(ours["memory_per_node_mb"], theirs["memory_per_node_mb"]),
        "start_s": _ratio(ours["start_s"], theirs["start_s"]),
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,256", help="comma-separated N for our DHT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hivemind", action="store_true")
    parser.add_argument("--no-kademlia", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # SYSTEM:N, run in this process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    if args.one:
        system, n = args.one.split(":")
        return asyncio.run(_RUNNERS[system](int(n), args.seed))
    runs = [("swarm", int(n)) for n in args.sizes.split(",")]
    runs += [] if args.no_kademlia else [("kademlia", 32)]
    runs += [] if args.no_hivemind else [("hivemind", 32)]
    results: dict[str, Any] = {}
    for system, n in runs:
        results[f"{system}_n{n}"] = _run_isolated(system, n, args.seed)
        print(json.dumps(results[f"{system}_n{n}"]), file=sys.stderr, flush=True)
    ours = results.get("swarm_n32")
    ratios = {k.split("_")[0]: _ratios(ours, v) for k, v in results.items() if ours and not k.startswith("swarm")}
    results["ratios_vs"] = ratios
    hm = ratios.get("hivemind", {})
    results["goals"] = {
        "success_under_churn_ge_0.99": all(
            r.get("get_success", 0) >= 0.99 for k, r in results.items() if k.startswith("swarm_")
        ),
        "get_p50_le_0.5x_hivemind": hm.get("get_p50") is not None and hm["get_p50"] <= 0.5,
        "memory_le_0.2x_hivemind": hm.get("memory_per_node") is not None and hm["memory_per_node"] <= 0.2,
    }
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
