"""Round trips on a step's critical path: the default run at several emulated link delays, and the slope.

Starts ``--nodes`` training nodes in this process (transport + DHT + training role each, as `swarm.node` builds
them), every transport with `TransportConfig.emulated_delay_s` = the one-way delay (so a round trip costs twice it,
see swarm/p2p/delay.py), trains ``--warmup`` steps, then times ``--steps`` more: the step time is the time the
slowest stage server takes to close them, divided by their number. Once per delay in ``--delays-ms``; a fresh swarm
each time. Then ``rtts_per_step`` is the least-squares slope of step time over round-trip time: how many round trips
a step waits for, one after the other (the goal of issue 15: <= 3).

    python benchmarks/bench_rtt.py [--delays-ms 0,10,25] [--steps 6] [--warmup 2] [--nodes 4] [--config FILE]
        [--set FIELD=VALUE ...] [--training FIELD=VALUE ...]

Prints one line per delay and, last, one JSON object: per delay ``s_per_step`` (the mean), ``median_s_per_step``
(robust to a step that hit a timeout or a busy machine) and ``final_loss``; ``rtts_per_step`` (the slope of the
means) and ``rtts_per_step_median``. ``BENCH_LOG=INFO`` shows the nodes' logs (each step's phases).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from swarm.configs import apply_overrides, build
from swarm.data import bind_data
from swarm.dht import DHT, DHTConfig
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.run.config import RunConfig
from swarm.training.schemas import with_run_schemas
from swarm.training.trainer import TrainingConfig, TrainingRole, build_training_role


@dataclasses.dataclass
class _Node:
    transport: Transport
    dht: DHT
    role: TrainingRole
    task: asyncio.Task[None]
    stop: asyncio.Event


async def _start(seed: int, delay_s: float, bootstrap: str | None, cfg: TrainingConfig, timeout_s: float) -> _Node:
    identity = Identity.from_seed(bytes([seed + 1]) * 32)
    transport = Transport(identity, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), emulated_delay_s=delay_s))
    await transport.start()
    dht = DHT.create(
        with_run_schemas(DHTConfig(initial_peers=(bootstrap,) if bootstrap else ())),
        identity=identity,
        transport=transport,
    )
    await dht.start()
    serving = asyncio.Event()
    role = build_training_role(
        dataclasses.replace(cfg, seed=seed), transport=transport, dht=dht, on_serving=lambda _s: serving.set()
    )
    stop = asyncio.Event()
    node = _Node(transport, dht, role, asyncio.create_task(role.run(stop)), stop)
    waiter = asyncio.ensure_future(serving.wait())
    async with asyncio.timeout(timeout_s):
        await asyncio.wait([node.task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if node.task.done():
        node.task.result()
    return node


async def _close(nodes: list[_Node]) -> None:
    for node in nodes:
        node.stop.set()
    for node in nodes:
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(node.task, return_exceptions=True)
        except TimeoutError:
            node.task.cancel()
            await asyncio.gather(node.task, return_exceptions=True)
        node.role.stop()
        await node.dht.shutdown()
        await node.transport.stop()


def _slowest_step(nodes: list[_Node]) -> int:
    steps = [n.role.state.server.step for n in nodes if n.role.state.server is not None]
    return min(steps) if len(steps) == len(nodes) else -1


async def measure(
    run: RunConfig, cfg: TrainingConfig, *, nodes: int, delay_s: float, warmup: int, steps: int, timeout_s: float
) -> dict[str, Any]:
    """Train a fresh swarm at ``delay_s``; the slowest server's seconds per step over ``steps`` after ``warmup``."""
    # each node of a real swarm has its own process and worker threads: in one process, the loop's default pool
    # (cpu + 4 threads) would make the nodes' compute wait for each other's threads
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=16 * nodes))
    live: list[_Node] = []
    try:
        for i in range(nodes):
            bootstrap = live[0].transport.listen_maddrs[0] if live else None
            live.append(await _start(i, delay_s, bootstrap, cfg, timeout_s))
        async with asyncio.timeout(timeout_s):
            while _slowest_step(live) < warmup:
                await asyncio.sleep(0.005)
            closed = [time.perf_counter()]  # when the slowest server reached each timed step
            while len(closed) <= steps:
                while _slowest_step(live) < warmup + len(closed):
                    await asyncio.sleep(0.005)
                closed.append(time.perf_counter())
    finally:
        await _close(live)
    last = warmup + steps - 1
    losses = [loss for n in live for loss in n.role.state.losses.get(last, [])]
    durations = sorted(b - a for a, b in itertools.pairwise(closed))
    return {
        "delay_ms": round(delay_s * 1e3, 3),
        "rtt_ms": round(2 * delay_s * 1e3, 3),
        "s_per_step": round((closed[-1] - closed[0]) / steps, 4),
        "median_s_per_step": round(durations[len(durations) // 2], 4),
        "final_loss": round(sum(losses) / len(losses), 4) if losses else None,
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays-ms", default="0,10,25", help="one-way delays to measure, comma-separated")
    ap.add_argument("--steps", type=int, default=6, help="steps timed at each delay")
    ap.add_argument("--warmup", type=int, default=2, help="steps trained before the timing starts")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--config", default=None, help="run config file or preset name (default: tiny_gpt)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="run-config override")
    ap.add_argument("--training", action="append", default=[], help="training-config override FIELD=VALUE")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="deadline of one delay's measurement")
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("BENCH_LOG", "ERROR"), format="%(relativeCreated)d %(name)s %(message)s")
    torch.set_num_threads(1)
    run = bind_data(RunConfig.load(args.config, args.overrides))
    data = apply_overrides({"start_after_peers": args.nodes, "rebalance_interval_s": 0}, args.training, TrainingConfig)
    cfg = dataclasses.replace(build(TrainingConfig, {**data, "run": run.to_dict()}), run=run)
    delays_s = [float(d) / 1e3 for d in args.delays_ms.split(",")]
    results = []
    for delay_s in delays_s:
        result = asyncio.run(
            measure(
                run,
                cfg,
                nodes=args.nodes,
                delay_s=delay_s,
                warmup=args.warmup,
                steps=args.steps,
                timeout_s=args.timeout_s,
            )
        )
        print(
            f"delay {result['delay_ms']} ms: {result['s_per_step']} s/step (median {result['median_s_per_step']}), "
            f"loss {result['final_loss']}",
            flush=True,
        )
        results.append(result)
    rtts_s = [2 * d for d in delays_s]
    out = {
        "nodes": args.nodes,
        "steps": args.steps,
        "per_delay": results,
        "rtts_per_step": round(slope(rtts_s, [r["s_per_step"] for r in results]), 2),
        "rtts_per_step_median": round(slope(rtts_s, [r["median_s_per_step"] for r in results]), 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
