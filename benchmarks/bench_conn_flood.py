"""Connection floods against a real node: how long a legitimate peer is refused, and how fast the node logs.

Starts a ``swarm-node start --role dht`` child (its code from ``--server-pythonpath``, so the same run can measure an
older tree), then for each attack a ``python -m swarm.testing.conn_flood`` child from this tree:

- ``handshaken``: ``--handshaken`` connections, each a real Noise handshake under a fresh identity, PINGing every
  ``--ping-interval`` s, reopened when closed;
- ``silent``: ``--silent`` TCP connections that never send a byte, reopened as fast as they close.

The attackers bind ``--sources`` loopback addresses (127.0.0.2 ...); the legitimate peer dials from 127.0.0.1
once the flood is up, calling ``dht.ping`` every 0.2 s until it succeeds or ``--window`` s pass. Warning lines of
the node's stderr are counted over ``--observe`` s from then. Prints one JSON object as its last line.

    python benchmarks/bench_conn_flood.py [--handshaken 512] [--silent 600] [--sources 8] [--window 30] \\
        [--observe 10] [--ping-interval 30] [--server-pythonpath DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from swarm.dht.messages import PingReply, PingRequest
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity

REPO = Path(__file__).resolve().parents[1]


class NodeProcess:
    """A ``swarm-node start`` child; a thread counts the WARNING lines of its stderr with their arrival time."""

    def __init__(self, data_dir: Path, pythonpath: str) -> None:
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-c", "from swarm.cli.node import main; main()", "start", "--role", "dht"]
        cmd += ["--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(  # cwd: `python -c` puts it first on sys.path, before PYTHONPATH
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=data_dir
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the node did not start: {line!r}")
        self.maddr = line.split()[-1]
        self.warnings: list[float] = []
        self._thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._thread.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if " WARNING swarm.p2p" in line:  # the transport's lines (a default node also runs a training role)
                self.warnings.append(time.monotonic())

    def warnings_between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.warnings) if start <= t < end)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _start_flood(
    maddr: str, kind: str, count: int, sources: list[str], ping_interval_s: float
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    cmd = [sys.executable, "-m", "swarm.testing.conn_flood", "--target", maddr, "--kind", kind, "--count", str(count)]
    cmd += ["--sources", ",".join(sources), "--ping-interval", str(ping_interval_s)]
    cmd += ["--concurrency", "16" if kind == "handshaken" else "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready {...}" once the first wave is open
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"the flood did not start: {line!r}")
    return proc, json.loads(line.split(maxsplit=1)[1])


def _stop(proc: subprocess.Popen[str]) -> dict[str, int]:
    """Stop the flood; its last stats line."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("stats ")]
    return json.loads(lines[-1].split(maxsplit=1)[1]) if lines else {}


async def _legit_peer(maddr: str, window_s: float) -> dict[str, Any]:
    """Call ``dht.ping`` until it works: seconds until then, attempts, the first error seen."""
    start = time.monotonic()
    attempts, first_error = 0, ""
    async with Transport(Identity.from_seed(b"\x07" * 32), TransportConfig()) as client:
        while time.monotonic() - start < window_s:
            attempts += 1
            try:
                await client.call(maddr, "dht.ping", PingRequest(), PingReply, timeout_s=5.0)
                return {
                    "connected": True,
                    "refused_s": round(time.monotonic() - start, 3),
                    "attempts": attempts,
                    "first_error": first_error,
                }
            except Exception as e:  # measured, whatever it is
                first_error = first_error or f"{type(e).__name__}: {e}"[:300]
                await asyncio.sleep(0.2)
    return {"connected": False, "refused_s": round(window_s, 3), "attempts": attempts, "first_error": first_error}


def _attack(node: NodeProcess, kind: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    sources = [f"127.0.0.{i}" for i in range(2, 2 + args.sources)]
    flood, ready = _start_flood(node.maddr, kind, count, sources, args.ping_interval)
    result: dict[str, Any] = {"flood_at_start": ready}
    try:
        start = time.monotonic()
        result.update(asyncio.run(_legit_peer(node.maddr, args.window)))
        time.sleep(max(0.0, start + args.observe - time.monotonic()))
        end = time.monotonic()
        lines = node.warnings_between(start, end)
        result.update(warning_lines=lines, warning_lines_per_s=round(lines / (end - start), 2))
        return result
    finally:
        result["flood_at_end"] = _stop(flood)
        time.sleep(1.0)  # let the node notice the closed connections


def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp), args.server_pythonpath)
        try:
            out: dict[str, Any] = {"server_pythonpath": args.server_pythonpath}
            out["handshaken"] = _attack(node, "handshaken", args.handshaken, args)
            out["silent"] = _attack(node, "silent", args.silent, args)
            out["legit_connected_under_both"] = out["handshaken"]["connected"] and out["silent"]["connected"]
            return out
        finally:
            node.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshaken", type=int, default=512)
    parser.add_argument("--silent", type=int, default=600)
    parser.add_argument("--sources", type=int, default=8, help="attacking source addresses, from 127.0.0.2")
    parser.add_argument("--window", type=float, default=30.0, help="seconds the legitimate peer keeps trying")
    parser.add_argument("--observe", type=float, default=10.0, help="seconds over which warning lines are counted")
    parser.add_argument("--ping-interval", type=float, default=30.0)
    parser.add_argument("--server-pythonpath", default=str(REPO))
    print(json.dumps(main(parser.parse_args())))
