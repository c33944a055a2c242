"""All-reduce benchmark: 4 peers (one process each) average 100 MiB of fp32 on loopback.

Compares, in the same run, swarm's butterfly all-reduce (encrypted transport, fixed agreed group: the exchange
only), ``torch.distributed.all_reduce`` with gloo, and hivemind's ``DecentralizedAverager`` (the all-reduce
after its matchmaking, via ``require_trigger``). Prints one JSON object as the last line: median seconds per
round of each, the ratios, the peak RSS of a swarm peer above its idle RSS, and the CPU an encrypted round cannot
avoid (gloo's plus AES-GCM's on the same bytes: `encrypted_floor_over_gloo`).

    python benchmarks/bench_allreduce.py [--size-mib 100] [--peers 4] [--rounds 3] [--skip-hivemind]
    sudo python benchmarks/bench_allreduce.py --profile wan [--size-mib 100] [--peers 4] [--rounds 3]

With ``--profile`` (lan, wan, home, far) every peer runs on its own host of the WAN test bed (docs/netbed.md)
instead of loopback, and the figures are seconds per round against the time the round's bytes need at the
profile's line rate (a butterfly round sends and receives ``2 (N-1)/N`` of the tensor per peer): goal
``line_rate_fraction`` >= 0.9, and at most 0.5x hivemind's time on the same bed (``ratio_to_hivemind``; skipped,
with the reason, when hivemind is not installed; if it fails on the bed, the error is reported and it runs on
loopback instead, labelled by ``hivemind_where``). The same bytes between the same hosts over plain kernel TCP
(one connection per pair, all at once) run first: ``tcp_line_rate_fraction`` is what the bed and the kernel's
TCP allow that pattern (``--tcp-ring``: also a ring pattern, one flow per link). gloo is not run on the bed: there
the link, not the CPU, is the limit.

``BENCH_ROUND_TIMEOUT_S`` (default 300) bounds each round; a peer that hangs past it dumps its stack and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import time
from typing import Any

import psutil
import torch

from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.p2p import Transport, TransportConfig
from swarm.averaging.allreduce import AllReduceServer, Group, run_allreduce
from swarm.averaging.config import AveragerConfig
from swarm.averaging.messages import MemberInfo, round_id_of
from swarm.averaging.wire import CompressionPartCodec
from swarm.testing.netbed import PROFILES, Bed, BedConfig
from swarm.testing.netbed.namespaces import enter_namespace

ROUND_TIMEOUT_S = float(os.environ.get("BENCH_ROUND_TIMEOUT_S", "300"))


def _numel(size_mib: float) -> int:
    return int(size_mib * 1024 * 1024) // 4


# ---------------------------------------------------------------- swarm


async def _swarm_peer(rank: int, size_mib: float, rounds: int, conn: Any, address: str) -> None:
    cfg = AveragerConfig(allreduce_timeout_s=ROUND_TIMEOUT_S, part_timeout_s=120.0, join_timeout_s=60.0)
    tcfg = TransportConfig(listen_maddrs=(f"/ip4/{address}/tcp/0",), rpc_timeout_s=60.0)
    async with Transport(Identity.generate(), tcfg) as transport:
        conn.send((transport.peer_id.to_bytes(), transport.listen_maddrs))
        peers = await asyncio.to_thread(conn.recv)
        members = []
        for i, (raw, maddrs) in enumerate(peers):
            members.append(MemberInfo(peer_id=raw, maddrs=tuple(maddrs), ready_at=float(i)))
            if i != rank:
                transport.add_addresses(PeerID(raw), [parse_maddr(m) for m in maddrs])
        server = AllReduceServer(cfg, transport, CompressionPartCodec("none"))
        server.register()
        idle_rss = psutil.Process().memory_info().rss
        tensor = torch.randn(_numel(size_mib), generator=torch.Generator().manual_seed(rank))
        times = []
        for r in range(rounds + 1):
            key = f"bench/avg/0/{r}"
            group = Group(
                group_key=key, round_id=round_id_of(key, tuple(members)), members=tuple(members), my_index=rank
            )
            server.expect(key, group.round_id)
            await asyncio.to_thread(conn.recv)  # the go signal
            faulthandler.dump_traceback_later(ROUND_TIMEOUT_S, exit=True)  # re-armed: it bounds each round
            start, cpu_start = time.perf_counter(), time.process_time()
            outcome = await run_allreduce(server, group, tensor, 1.0)
            times.append(time.perf_counter() - start)
            faults = len(outcome.lost_owners) + len(outcome.dropped_senders)
            if faults and address == "127.0.0.1":  # loopback never loses a peer; the bed's links may
                raise RuntimeError(f"peer {rank} lost peers in round {r}: {outcome}")
            conn.send((times[-1], time.process_time() - cpu_start, faults))
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        connections = transport.connection_counts()["established"]
        conn.send({"idle_rss": idle_rss, "peak_rss": peak_rss, "connections": connections})
        # run_allreduce returns once our results are written to the sockets, not once the others have them: stay
        # up until every peer is done, or closing the transport would cut off the tail of what they fetch
        await asyncio.to_thread(conn.recv)


def _swarm_main(rank: int, size_mib: float, rounds: int, conn: Any, host: tuple[str, str] | None) -> None:
    torch.set_num_threads(1)  # 4 peers share the machine's cores: no intra-op thread pools fighting
    logging.basicConfig(level=logging.WARNING, format=f"peer {rank} %(asctime)s %(name)s: %(message)s")
    logging.getLogger("swarm.p2p.connection").setLevel(logging.DEBUG)  # why a connection closed, if one does
    faulthandler.dump_traceback_later(ROUND_TIMEOUT_S, exit=True)  # a hung peer shows where it hangs
    address = "127.0.0.1"
    if host is not None:  # a host of the WAN test bed: (its namespace, its address)
        enter_namespace(host[0])
        address = host[1]
    asyncio.run(_swarm_peer(rank, size_mib, rounds, conn, address))


def bench_swarm(peers: int, size_mib: float, rounds: int, bed: Bed | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(peers)]
    hosts = [None if bed is None else (bed.namespaces[i], bed.address(i)) for i in range(peers)]
    procs = [ctx.Process(target=_swarm_main, args=(i, size_mib, rounds, pipes[i][1], hosts[i])) for i in range(peers)]
    for p in procs:
        p.start()
    try:
        infos = [_recv(pipes[i][0]) for i in range(peers)]
        for parent, _ in pipes:
            parent.send(infos)
        round_times, round_cpu, round_sent, round_drops, round_faults = [], [], [], [], []
        for _ in range(rounds + 1):
            before = bed.stats() if bed is not None else []
            for parent, _ in pipes:
                parent.send("go")
            answers = [_recv(parent) for parent, _ in pipes]
            if bed is not None:
                after = bed.stats()
                round_sent.append(
                    statistics.mean(a["sent_bytes"] - b["sent_bytes"] for a, b in zip(after, before, strict=True))
                )
                round_drops.append(_dropped(before, after))
            round_times.append(max(wall for wall, _, _ in answers))
            round_faults.append(sum(f for _, _, f in answers))
            print(f"swarm round {len(round_times) - 1}: {round_times[-1]:.2f}s, faults {round_faults[-1]}", flush=True)
            round_cpu.append(statistics.mean(cpu for _, cpu, _ in answers))
        mem = [_recv(parent) for parent, _ in pipes]
        for parent, _ in pipes:
            parent.send("done")
    finally:
        _join(procs)
    above = max(m["peak_rss"] - m["idle_rss"] for m in mem)
    return {
        "median_s": statistics.median(round_times[1:]),
        "rounds_s": round_times,
        "cpu_s_per_peer": statistics.median(round_cpu[1:]),
        "peak_rss_above_idle_mib": above / 2**20,
        "sent_bytes_per_peer": statistics.median(round_sent[1:]) if round_sent else None,
        "frames_dropped": round_drops,
        "peer_faults": round_faults,  # owners lost plus senders dropped, summed over peers, per round
        "connections_per_peer": [m["connections"] for m in mem],
    }


def bench_on_bed(args: argparse.Namespace) -> dict[str, Any]:
    """Plain TCP, the swarm's butterfly and hivemind's averager on the WAN test bed, one peer per host, against
    the profile's line rate."""
    profile = PROFILES[args.profile]
    per_peer_bytes = 2 * (args.peers - 1) / args.peers * _numel(args.size_mib) * 4
    line_rate_s = per_peer_bytes * 8 / (profile.path_mbit * 1e6)
    skipped = None
    if args.skip_hivemind:
        skipped = "--skip-hivemind"
    elif importlib.util.find_spec("hivemind") is None:
        skipped = "hivemind is not installed (pip install -e '.[bench]')"
    hive, hive_where, hive_error = None, None, None
    with Bed(BedConfig(hosts=args.peers, profile=args.profile)) as bed:
        tcp = bench_tcp(args.peers, args.size_mib, args.rounds, bed)
        print(f"plain TCP on the bed ({args.profile}): {tcp}", flush=True)
        ring = bench_tcp(args.peers, args.size_mib, args.rounds, bed, ring=True) if args.tcp_ring else None
        if ring is not None:
            print(f"plain TCP, ring pattern, on the bed ({args.profile}): {ring}", flush=True)
        swarm = bench_swarm(args.peers, args.size_mib, args.rounds, bed)
        print(f"swarm on the bed ({args.profile}): {swarm}", flush=True)
        if skipped is None:
            try:
                hive, hive_where = bench_hivemind(args.peers, args.size_mib, args.rounds, bed), args.profile
            except Exception as e:  # reported, then tried on loopback (clearly labelled) below
                hive_error = f"{type(e).__name__}: {e}"
            print(f"hivemind on the bed ({args.profile}): {hive or hive_error}", flush=True)
    if skipped is None and hive is None:
        hive, hive_where = bench_hivemind(args.peers, args.size_mib, args.rounds), "loopback (not the bed)"
        print(f"hivemind on loopback: {hive}", flush=True)
    return {
        "benchmark": "allreduce",
        "profile": args.profile,
        "peers": args.peers,
        "tensor_mib": _numel(args.size_mib) * 4 / 2**20,
        "rounds": args.rounds,
        "line_rate_s": round(line_rate_s, 4),
        "payload_bytes_per_peer": int(per_peer_bytes),
        "swarm_median_s": round(swarm["median_s"], 4),
        "swarm_rounds_s": [round(t, 3) for t in swarm["rounds_s"]],
        "line_rate_fraction": round(line_rate_s / swarm["median_s"], 3),
        "wire_bytes_sent_per_peer": swarm["sent_bytes_per_peer"],
        "swarm_frames_dropped": swarm["frames_dropped"],
        "swarm_peer_faults": swarm["peer_faults"],
        "swarm_connections_per_peer": swarm["connections_per_peer"],
        "swarm_cpu_s_per_peer": round(swarm["cpu_s_per_peer"], 4),
        # the same bytes between the same hosts over plain kernel TCP (one connection per pair, all at once)
        "tcp_median_s": round(tcp["median_s"], 4),
        "tcp_rounds_s": [round(t, 3) for t in tcp["rounds_s"]],
        "tcp_line_rate_fraction": round(line_rate_s / tcp["median_s"], 3),
        "tcp_frames_dropped": tcp["frames_dropped"],
        "swarm_over_tcp": round(swarm["median_s"] / tcp["median_s"], 3),
        "tcp_ring_line_rate_fraction": None if ring is None else round(line_rate_s / ring["median_s"], 3),
        "hivemind_median_s": None if hive is None else round(hive["median_s"], 4),
        "hivemind_rounds_s": None if hive is None else [round(t, 3) for t in hive["rounds_s"]],
        "hivemind_where": hive_where,
        "hivemind_bed_error": hive_error,
        "ratio_to_hivemind": None if hive is None else round(swarm["median_s"] / hive["median_s"], 3),
        "hivemind_skipped": skipped,
        "goal": "line_rate_fraction >= 0.9, ratio_to_hivemind <= 0.5",
    }


# ---------------------------------------------------------------- plain TCP, the same pattern


def _tcp_main(
    rank: int,
    peers: int,
    each_bytes: int,
    rounds: int,
    conn: Any,
    host: tuple[str, str],
    cc: str | None = None,
    ring: bool = False,
) -> None:
    """Send ``each_bytes`` to every other host and receive as much from each, over one plain TCP connection per
    pair (kept across rounds, as the transport keeps its connections): the bytes of a butterfly round, without
    the all-reduce. What the bed and the kernel's TCP allow. ``ring``: the same bytes to the next host only
    (one flow per link, as a ring all-reduce sends them)."""
    import socket
    import threading

    enter_namespace(host[0])
    listener = socket.create_server((host[1], 0))
    conn.send((host[1], listener.getsockname()[1]))
    addresses = conn.recv()
    incoming: list[socket.socket] = []

    targets = [(rank + 1) % peers] if ring else [j for j in range(peers) if j != rank]
    if ring:
        each_bytes *= peers - 1

    def accept() -> None:
        for _ in range(len(targets)):
            incoming.append(listener.accept()[0])

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    outgoing = []
    for j in targets:
        sock = socket.socket()
        if cc is not None:  # a congestion control other than the host's default (diagnostics)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        sock.connect(addresses[j])
        outgoing.append(sock)
    acceptor.join()
    block = memoryview(bytearray(each_bytes))

    def send(sock: socket.socket) -> None:
        sock.sendall(block)

    def receive(sock: socket.socket) -> None:
        buf, left = bytearray(1 << 20), each_bytes
        while left > 0:
            n = sock.recv_into(buf, min(len(buf), left))
            if n == 0:
                raise ConnectionError("closed early")
            left -= n

    times = []
    for _ in range(rounds + 1):
        conn.recv()  # the go signal
        start = time.perf_counter()
        threads = [threading.Thread(target=send, args=(s,)) for s in outgoing]
        threads += [threading.Thread(target=receive, args=(s,)) for s in incoming]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - start)
        conn.send(times[-1])
    for s in [*outgoing, *incoming, listener]:
        s.close()


def bench_tcp(
    peers: int, size_mib: float, rounds: int, bed: Bed, cc: str | None = None, ring: bool = False
) -> dict[str, Any]:
    """The round's bytes over plain TCP on the bed: ``2 / N`` of the tensor from every host to every other."""
    each_bytes = int(2 * _numel(size_mib) * 4 / peers)
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(peers)]
    hosts = [(bed.namespaces[i], bed.address(i)) for i in range(peers)]
    procs = [
        ctx.Process(target=_tcp_main, args=(i, peers, each_bytes, rounds, pipes[i][1], hosts[i], cc, ring))
        for i in range(peers)
    ]
    for p in procs:
        p.start()
    try:
        addresses = [_recv(parent) for parent, _ in pipes]
        for parent, _ in pipes:
            parent.send(addresses)
        round_times, drops = [], []
        for _ in range(rounds + 1):
            before = bed.stats()
            for parent, _ in pipes:
                parent.send("go")
            round_times.append(max(_recv(parent) for parent, _ in pipes))
            drops.append(_dropped(before, bed.stats()))
    finally:
        _join(procs)
    return {"median_s": statistics.median(round_times[1:]), "rounds_s": round_times, "frames_dropped": drops}


def _dropped(before: list[dict[str, int]], after: list[dict[str, int]]) -> int:
    return sum(a["queue_drops"] + a["lost"] - b["queue_drops"] - b["lost"] for a, b in zip(after, before, strict=True))


# ---------------------------------------------------------------- the cipher's share


def bench_cipher(peers: int, size_mib: float) -> float:
    """CPU seconds one swarm peer's transport spends in AES-GCM per round (both directions), on an idle core.

    A butterfly round sends and receives ``2 (N-1)/N`` of the tensor per peer, as gloo's ring does; the cipher
    is the one cost an encrypted all-reduce adds to gloo's work whatever its language, so gloo's CPU plus this
    is the least CPU an encrypted round can take.
    """
    from swarm.p2p.sealing import MAX_PLAINTEXT_BYTES
    from swarm.p2p.noise import TAG_LEN, CipherState

    each_way = int(2 * (peers - 1) / peers * _numel(size_mib) * 4)
    plain, sealed = bytearray(MAX_PLAINTEXT_BYTES), bytearray(MAX_PLAINTEXT_BYTES + TAG_LEN)
    sender, receiver = CipherState(bytes(32)), CipherState(bytes(32))
    records = -(-each_way // MAX_PLAINTEXT_BYTES)
    start = time.process_time()
    for _ in range(records):
        sender.encrypt_into(memoryview(plain), memoryview(sealed))
        receiver.decrypt_into(memoryview(sealed), memoryview(plain))
    return time.process_time() - start


# ---------------------------------------------------------------- gloo


def _gloo_main(rank: int, peers: int, port: int, size_mib: float, rounds: int, conn: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=peers)
    tensor = torch.randn(_numel(size_mib), generator=torch.Generator().manual_seed(rank))
    times, cpu = [], []
    for _ in range(rounds + 1):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        dist.all_reduce(tensor)
        tensor /= peers
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    dist.destroy_process_group()
    conn.send((times, cpu))


def bench_gloo(peers: int, size_mib: float, rounds: int) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(peers)]
    procs = [ctx.Process(target=_gloo_main, args=(i, peers, port, size_mib, rounds, pipes[i][1])) for i in range(peers)]
    for p in procs:
        p.start()
    try:
        per_peer = [_recv(parent) for parent, _ in pipes]
    finally:
        _join(procs)
    round_times = [max(t[r] for t, _ in per_peer) for r in range(rounds + 1)]
    round_cpu = [statistics.mean(c[r] for _, c in per_peer) for r in range(rounds + 1)]
    return {
        "median_s": statistics.median(round_times[1:]),
        "rounds_s": round_times,
        "cpu_s_per_peer": statistics.median(round_cpu[1:]),
    }


# ---------------------------------------------------------------- hivemind


def _hivemind_main(rank: int, size_mib: float, rounds: int, conn: Any, host: tuple[str, str] | None = None) -> None:
    import hivemind
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # hivemind's averager is an mp.Process that must fork, not spawn
    address = "127.0.0.1"
    if host is not None:  # a host of the WAN test bed; the processes hivemind starts inherit its namespace
        enter_namespace(host[0])
        address = host[1]
    initial = conn.recv()
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=[f"/ip4/{address}/tcp/0"])
    conn.send([str(a) for a in dht.get_visible_maddrs()])
    tensor = torch.randn(_numel(size_mib), generator=torch.Generator().manual_seed(rank))
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor],
        dht,
        start=True,
        prefix="bench",
        target_group_size=4,
        min_group_size=4,
        min_matchmaking_time=5.0,
        request_timeout=3.0,
        allreduce_timeout=ROUND_TIMEOUT_S,
    )
    times = []
    try:
        for _ in range(rounds + 1):
            conn.recv()  # the go signal
            control = averager.step(wait=False, require_trigger=True, timeout=ROUND_TIMEOUT_S)
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                if time.monotonic() > deadline:
                    raise TimeoutError("hivemind matchmaking did not finish")
                time.sleep(0.01)
            conn.send("matched")
            conn.recv()  # everyone matched: start the all-reduce together
            start = time.perf_counter()
            control.allow_allreduce()
            result = control.result(timeout=ROUND_TIMEOUT_S)
            times.append(time.perf_counter() - start)
            if not result or len(result) != 4:
                raise RuntimeError(f"hivemind averaged with {0 if not result else len(result)} peers, not 4")
        conn.send(times)
        conn.recv()  # every peer is done: shutting down earlier cuts off the tail of what the others fetch
    finally:
        averager.shutdown()
        dht.shutdown()


def bench_hivemind(peers: int, size_mib: float, rounds: int, bed: Bed | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(peers)]
    hosts = [None if bed is None else (bed.namespaces[i], bed.address(i)) for i in range(peers)]
    procs = [
        ctx.Process(target=_hivemind_main, args=(i, size_mib, rounds, pipes[i][1], hosts[i])) for i in range(peers)
    ]
    for p in procs:
        p.start()
    try:
        pipes[0][0].send([])
        first = _recv(pipes[0][0])
        for parent, _ in pipes[1:]:
            parent.send(first)
            _recv(parent)
        for _ in range(rounds + 1):
            for parent, _ in pipes:
                parent.send("go")
            for parent, _ in pipes:
                _recv(parent)
            for parent, _ in pipes:
                parent.send("start")
        per_peer = [_recv(parent) for parent, _ in pipes]
        for parent, _ in pipes:
            parent.send("done")
    finally:
        _join(procs)
    round_times = [max(t[r] for t in per_peer) for r in range(rounds + 1)]
    return {"median_s": statistics.median(round_times[1:]), "rounds_s": round_times}


# ---------------------------------------------------------------- main


def _recv(conn: Any) -> Any:
    if not conn.poll(ROUND_TIMEOUT_S * 2):
        raise TimeoutError("a benchmark peer did not answer in time")
    return conn.recv()


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=30)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=100.0)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-hivemind", action="store_true")
    parser.add_argument("--tcp-ring", action="store_true", help="on the bed: also plain TCP in a ring pattern")
    parser.add_argument("--profile", choices=tuple(PROFILES), default=None, help="run on the WAN test bed (root)")
    parser.add_argument("--only-hivemind", action="store_true", help="debugging: run hivemind alone, print its figures")
    args = parser.parse_args()
    tensor_mib = _numel(args.size_mib) * 4 / 2**20
    if args.profile is not None:
        print(json.dumps(bench_on_bed(args)))
        return
    if args.only_hivemind:
        print(json.dumps({"hivemind": bench_hivemind(args.peers, args.size_mib, args.rounds)}))
        return
    swarm = bench_swarm(args.peers, args.size_mib, args.rounds)
    print(f"swarm: {swarm}", flush=True)
    gloo = bench_gloo(args.peers, args.size_mib, args.rounds)
    print(f"gloo: {gloo}", flush=True)
    cipher_cpu_s = bench_cipher(args.peers, args.size_mib)
    floor_cpu_s = gloo["cpu_s_per_peer"] + cipher_cpu_s
    hive = None if args.skip_hivemind else bench_hivemind(args.peers, args.size_mib, args.rounds)
    print(f"hivemind: {hive}", flush=True)
    result = {
        "benchmark": "allreduce",
        "peers": args.peers,
        "tensor_mib": tensor_mib,
        "rounds": args.rounds,
        "swarm_median_s": round(swarm["median_s"], 4),
        "gloo_median_s": round(gloo["median_s"], 4),
        "hivemind_median_s": None if hive is None else round(hive["median_s"], 4),
        "swarm_over_gloo": round(swarm["median_s"] / gloo["median_s"], 3),
        "swarm_cpu_s_per_peer": round(swarm["cpu_s_per_peer"], 4),
        "gloo_cpu_s_per_peer": round(gloo["cpu_s_per_peer"], 4),
        # rounds are CPU-bound when peers outnumber cores: then gloo's CPU plus the cipher's bounds what an
        # encrypted all-reduce can reach, and the rest of swarm's CPU is its own overhead (Python, framing, checks)
        "cores": os.cpu_count(),
        "cipher_cpu_s_per_peer": round(cipher_cpu_s, 4),
        "encrypted_floor_over_gloo": round(floor_cpu_s / gloo["cpu_s_per_peer"], 3),
        "swarm_overhead_cpu_s_per_peer": round(swarm["cpu_s_per_peer"] - floor_cpu_s, 4),
        "swarm_over_hivemind": None if hive is None else round(swarm["median_s"] / hive["median_s"], 3),
        "swarm_peak_rss_above_idle_mib": round(swarm["peak_rss_above_idle_mib"], 1),
        "swarm_peak_rss_over_tensor": round(swarm["peak_rss_above_idle_mib"] / tensor_mib, 3),
        "goal": "swarm_over_gloo <= 1.5, swarm_over_hivemind <= 0.5, swarm_peak_rss_over_tensor <= 3",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
