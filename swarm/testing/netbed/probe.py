"""Measurement probes for the bed, run inside its hosts: TCP round trips, bulk TCP throughput, UDP loss.

    python -m swarm.testing.netbed.probe serve --port 5201                       # on the measured host
    python -m swarm.testing.netbed.probe rtt --host 10.77.0.2 --count 20         # median TCP RTT (ms)
    python -m swarm.testing.netbed.probe bulk --host 10.77.0.2 --seconds 3       # upload rate (Mbit/s)
    python -m swarm.testing.netbed.probe bulk --host 10.77.0.2 --seconds 3 --download
    python -m swarm.testing.netbed.probe udp --host 10.77.0.2 --count 4000       # fraction of datagrams lost

Each client prints one JSON line. The rate is measured where the bytes arrive, over the part of the transfer
after slow start (``--skip`` of it), from the byte counts the receiver samples every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from typing import Any

CHUNK_BYTES = 1 << 16
SAMPLE_S = 0.05


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def _sink(conn: socket.socket, seconds: float | None = None) -> list[tuple[float, int]]:
    """Read until EOF (or for ``seconds``); the (time, bytes so far) samples."""
    samples: list[tuple[float, int]] = []
    total, next_sample = 0, 0.0
    start = time.monotonic()
    while True:
        chunk = conn.recv(1 << 20)
        now = time.monotonic() - start
        if not chunk:
            break
        total += len(chunk)
        if now >= next_sample:
            samples.append((now, total))
            next_sample = now + SAMPLE_S
        if seconds is not None and now >= seconds:
            break
    samples.append((time.monotonic() - start, total))
    return samples


def _source(conn: socket.socket, seconds: float) -> None:
    block = b"\0" * CHUNK_BYTES
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(block)


def _handle(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = _recv_exact(conn, 1)
        if mode == b"e":  # echo one byte at a time
            while byte := conn.recv(1):
                conn.sendall(byte)
        elif mode == b"s":  # sink: read to EOF, answer the samples
            samples = _sink(conn)
            conn.sendall(json.dumps(samples).encode())
        elif mode == b"o":  # source: send for the given seconds
            seconds = float(_recv_exact(conn, 8).decode())
            _source(conn, seconds)
        elif mode == b"u":  # udp count: answer how many datagrams the udp socket got
            conn.sendall(json.dumps(UDP_COUNT[0]).encode())


UDP_COUNT = [0]


def serve(port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))

    def count_udp() -> None:
        while True:
            udp.recv(65536)
            UDP_COUNT[0] += 1

    threading.Thread(target=count_udp, daemon=True).start()
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    print(json.dumps({"serving": port}), flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _connect(host: str, port: int, mode: bytes) -> socket.socket:
    conn = socket.create_connection((host, port), timeout=60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(mode)
    return conn


def rtt(host: str, port: int, count: int) -> dict[str, Any]:
    with _connect(host, port, b"e") as conn:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"x")
            _recv_exact(conn, 1)
            times.append(time.perf_counter() - start)
    return {"rtt_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000, "max_ms": max(times) * 1000}


def _rate(samples: list[tuple[float, int]], skip: float) -> dict[str, Any]:
    end_t, end_bytes = samples[-1]
    start_t, start_bytes = next(((t, b) for t, b in samples if t >= skip * end_t), samples[0])
    mbit = (end_bytes - start_bytes) * 8 / max(end_t - start_t, 1e-9) / 1e6
    return {"mbit_per_s": mbit, "bytes": end_bytes, "seconds": end_t}


def bulk(host: str, port: int, seconds: float, download: bool, skip: float) -> dict[str, Any]:
    if download:
        with _connect(host, port, b"o") as conn:
            conn.sendall(f"{seconds:8.3f}".encode())
            return _rate(_sink(conn), skip)
    with _connect(host, port, b"s") as conn:
        _source(conn, seconds)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return _rate([(t, b) for t, b in json.loads(reply)], skip)


def udp_loss(host: str, port: int, count: int, interval_s: float) -> dict[str, Any]:
    with _connect(host, port, b"u") as conn:
        before = int(conn.recv(64))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        sock.sendto(i.to_bytes(4, "big") * 16, (host, port))
        time.sleep(interval_s)
    time.sleep(1.0)  # the last datagrams are still on the link
    with _connect(host, port, b"u") as conn:
        got = int(conn.recv(64)) - before
    return {"sent": count, "received": got, "loss": 1 - got / count}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.testing.netbed.probe")
    parser.add_argument("mode", choices=("serve", "rtt", "bulk", "udp"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip", type=float, default=0.3, help="fraction of the transfer left out of the rate")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--interval", type=float, default=0.0005, help="udp: seconds between datagrams")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.port)
    elif args.mode == "rtt":
        print(json.dumps(rtt(args.host, args.port, args.count)))
    elif args.mode == "bulk":
        print(json.dumps(bulk(args.host, args.port, args.seconds, args.download, args.skip)))
    else:
        print(json.dumps(udp_loss(args.host, args.port, args.count, args.interval)))


if __name__ == "__main__":
    main()
