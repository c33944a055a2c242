"""NAT benchmark: what relaying costs (docs/transport.md, "Reachability and relays").

1. **Relay CPU per relayed MB** (loopback, no root needed): a relay in a child process; a peer that nobody can
   dial holds a reservation there; a dialler streams ``--size-mib`` through the circuit (end-to-end Noise), then
   the same bytes directly to a public peer for comparison. The child reports its own CPU time while relaying.
2. **Step time relayed vs all public** (needs root, ``ip`` and ``nft``: the NAT bed of ``swarm.testing.natbed``):
   the same 4-node, 2-stage swarm twice: all four nodes public, then a stage-0 driver behind NAT A and a stage-1
   server behind NAT B, reaching each other through relays. Step time: the median of the stage servers' step
   durations ("step N done ... X.XXs"), warm-up steps left out; ``--rounds`` alternating runs of each, the best
   (lowest) of each kind compared, as the machine is shared (the medians are reported too). Goal: relayed <= 1.3x
   all public. ``--profile wan`` (also needs /dev/net/tun) runs both swarms on emulated links of that WAN bed
   profile (``swarm.testing.natwan``): each public host's and each home router's uplink is one access link, so
   a home reaches a public host at the profile's round trip and two homes through a relay at twice it.

Prints one JSON object as its last line.

    python benchmarks/bench_nat.py [--size-mib 256] [--steps 15] [--rounds 2] [--skip-bed] [--profile wan]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.nat.natnodes starts the bed's node processes

from swarm.p2p import RpcContext, Transport, TransportConfig  # noqa: E402
from swarm.p2p.identity import Identity  # noqa: E402
from swarm.p2p.maddr import circuit_address, parse_maddr  # noqa: E402
from swarm.p2p.messages import Message  # noqa: E402
from swarm.p2p.relay import RelayConfig, RelayService  # noqa: E402
from swarm.p2p.relays import RelaySet  # noqa: E402

if TYPE_CHECKING:
    from tests.nat.natnodes import AnyNatBed

CHUNK_BYTES = 1 << 20
GOAL_STEP_RATIO = 1.3


@dataclass(frozen=True, kw_only=True)
class Blob(Message):
    size_bytes: int = 0


# -- part 1: relay CPU --


async def relay_child() -> None:
    """The relay process: prints its multiaddr, then on each stdin line its CPU seconds and bytes relayed."""
    config = TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=60)
    async with Transport(Identity.generate(), config) as transport:
        relay = RelayService(RelayConfig(max_bandwidth_bytes_per_s=1 << 40), transport)
        relay.start()
        print(transport.listen_maddrs[0], flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "quit":
                break
            print(json.dumps({"cpu_s": time.process_time(), "bytes": relay.total_bytes_relayed}), flush=True)
        await relay.stop()


async def _sink(ctx: RpcContext, header: Blob, chunks: AsyncIterator[bytes]) -> tuple[Blob, None]:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
    return Blob(size_bytes=total), None


async def _send(dialler: Transport, peer: object, size_bytes: int) -> float:
    payload = os.urandom(CHUNK_BYTES)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(size_bytes // CHUNK_BYTES):
            yield payload

    start = time.perf_counter()
    async with dialler.open_stream(peer, "sink", Blob(), Blob, chunks=chunks(), timeout_s=60) as stream:  # type: ignore[arg-type]
        assert stream.reply.size_bytes == size_bytes
    return time.perf_counter() - start


async def relay_cpu(size_mib: int) -> dict[str, float]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--relay-child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        relay_addr = parse_maddr(child.stdout.readline().strip())
        config = TransportConfig(rpc_timeout_s=60)
        async with (
            Transport(Identity.generate(), config) as behind,
            Transport(Identity.generate(), TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",))) as public,
            Transport(Identity.generate(), config) as dialler,
        ):
            for t in (behind, public):
                t.register_stream("sink", Blob, _sink)
            behind.add_addresses(relay_addr.peer_id, [relay_addr])  # type: ignore[arg-type]
            relays = RelaySet(behind, count=1, retry_s=1.0, timeout_s=10.0)
            relays.start()
            await relays.maintain([relay_addr.peer_id])  # type: ignore[list-item]
            circuit = circuit_address(relay_addr, behind.peer_id)
            size_bytes = size_mib * CHUNK_BYTES
            await _send(dialler, circuit, CHUNK_BYTES * 4)  # warm-up: the circuit is open
            child.stdin.write("mark\n")
            child.stdin.flush()
            before = json.loads(child.stdout.readline())
            relayed_s = await _send(dialler, circuit, size_bytes)
            child.stdin.write("mark\n")
            child.stdin.flush()
            after = json.loads(child.stdout.readline())
            direct_s = await _send(dialler, parse_maddr(public.listen_maddrs[0]), size_bytes)
            relays.stop()
        mb = (after["bytes"] - before["bytes"]) / 1e6
        return {
            "relayed_MB": round(mb, 1),
            "relay_cpu_ms_per_MB": round(1000 * (after["cpu_s"] - before["cpu_s"]) / mb, 3),
            "relayed_MBps": round(size_bytes / 1e6 / relayed_s, 1),
            "direct_MBps": round(size_bytes / 1e6 / direct_s, 1),
        }
    finally:
        if child.poll() is None:
            child.stdin.write("quit\n")
            child.stdin.flush()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# -- part 2: step time on the NAT bed --

STEP_LINE = re.compile(r"step (\d+) done \([^;]*; ([0-9.]+)s:")


def make_bed(*, nat: bool, profile: str | None) -> AnyNatBed:
    """The bed of one swarm: 2 public hosts and 2 homes (``nat``) or 4 public hosts; on ``profile``'s links."""
    from swarm.testing.natbed import NatBed
    from swarm.testing.natwan import NatWanBed

    public, homes = (2, 2) if nat else (4, 0)
    if profile is not None:
        return NatWanBed(public=public, homes=homes, profile=profile)
    return NatBed(public=public, homes=homes, tag=("bn" if nat else "bp") + str(os.getpid()))


def swarm_step_time(*, nat: bool, steps: int, work: Path, profile: str | None = None) -> tuple[float, float]:
    """The median and the mean step duration (s) of the stage servers of one 4-node swarm on the bed (warm-up steps
    left out: the first two)."""
    from tests.nat.natnodes import bootstrap_maddr, start_nodes, stop_nodes
    from tests.training.swarm_harness import small_run

    work.mkdir(parents=True, exist_ok=True)
    config = work / "run.toml"
    config.write_text(small_run().to_toml())
    common = ["--config", str(config), "--start-after-peers", "4", "--log-level", "INFO"]
    with make_bed(nat=nat, profile=profile) as bed:
        hosts = [*bed.public_hosts, *bed.homes]  # nat: p1, p2, home A, home B; else p1..p4
        order = [hosts[0], hosts[1], hosts[2], hosts[3]]
        specs = [
            (order[0], [*common, "--stage", "0"]),
            (order[1], [*common, "--stage", "1"]),
            (order[2], [*common, "--stage", "0"]),
            (order[3], [*common, "--stage", "1", "--role", "server"]),
        ]
        nodes = start_nodes(bed, work, specs, bootstrap_maddr(order[0], work))
        try:
            deadline = time.monotonic() + 600
            while min(n.newest_step() for n in nodes) < steps:
                if time.monotonic() > deadline or any(n.proc.poll() is not None for n in nodes):
                    raise RuntimeError(f"the swarm did not reach step {steps}; logs in {work}")
                time.sleep(0.5)
        finally:
            stop_nodes(nodes)
        durations = [
            float(s) for n in nodes for step, s in STEP_LINE.findall(n.log.read_text()) if 2 <= int(step) <= steps
        ]
    return statistics.median(durations), statistics.fmean(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each swarm (best one counts)")
    parser.add_argument("--skip-bed", action="store_true", help="only the relay CPU part (no root needed)")
    parser.add_argument(
        "--profile", choices=("lan", "wan", "home", "far"), default=None, help="run the swarms on emulated WAN links"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the nodes' logs here (default: a temp dir)")
    parser.add_argument("--relay-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay_child:
        asyncio.run(relay_child())
        return
    load_start = [round(x, 2) for x in os.getloadavg()]
    result: dict[str, object] = dict(asyncio.run(relay_cpu(args.size_mib)))
    if not args.skip_bed:
        from swarm.testing.natbed import unavailable_reason
        from swarm.testing.natwan import unavailable_reason as wan_unavailable_reason

        reason = unavailable_reason() if args.profile is None else wan_unavailable_reason()
        if reason is not None:
            result["bed_skipped"] = reason
        else:
            public: list[tuple[float, float]] = []
            relayed: list[tuple[float, float]] = []
            with tempfile.TemporaryDirectory() as tmp:
                root = args.work_dir or Path(tmp)
                for i in range(args.rounds):
                    for nat, times in ((False, public), (True, relayed)):
                        work = root / f"{'nat' if nat else 'public'}{i}"
                        times.append(swarm_step_time(nat=nat, steps=args.steps, work=work, profile=args.profile))
            public_s, relayed_s = min(m for m, _ in public), min(m for m, _ in relayed)
            ratio = relayed_s / public_s
            mean_ratio = min(m for _, m in relayed) / min(m for _, m in public)
            result.update(
                profile=args.profile or "none (no emulated links)",
                uptime_load_start_end=[load_start, [round(x, 2) for x in os.getloadavg()]],
                step_s_all_public_rounds=[round(m, 3) for m, _ in public],
                step_s_relayed_rounds=[round(m, 3) for m, _ in relayed],
                step_ratio_median_of_rounds=round(
                    statistics.median(m for m, _ in relayed) / statistics.median(m for m, _ in public), 3
                ),
                mean_step_s_all_public_rounds=[round(m, 3) for _, m in public],
                mean_step_s_relayed_rounds=[round(m, 3) for _, m in relayed],
                mean_step_ratio_best=round(mean_ratio, 3),
                step_s_all_public=round(public_s, 3),
                step_s_relayed=round(relayed_s, 3),
                step_ratio_relayed_vs_public=round(ratio, 3),
                goal_step_ratio_met=ratio <= GOAL_STEP_RATIO,
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
