"""`swarm-node start` processes inside the NAT bed's namespaces, and waiting on their events."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.local.events import EventReader, ListeningEvent, ReachabilityEvent, StoppedEvent
from swarm.testing.natbed import Host, NatBed, unavailable_reason

PORT = 4001


def skip_without_bed() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class BedNode:
    host: Host
    proc: subprocess.Popen[str]
    log: Path
    events: EventReader
    summary: Path

    @property
    def maddr(self) -> str:
        listening = self.events.first(ListeningEvent)
        assert listening is not None
        return listening.maddrs[0]

    def reachability(self) -> ReachabilityEvent | None:
        """The newest reachability event so far."""
        self.events.poll()
        found = [e for e in self.events.events if isinstance(e, ReachabilityEvent)]
        return found[-1] if found else None

    def newest_step(self) -> int:
        return max((int(m) for m in re.findall(r"step (\d+) done", self.log.read_text())), default=-1)


def start_node(bed: NatBed, host: Host, tmp_path: Path, args: list[str], bootstrap: str | None = None) -> BedNode:
    name = host.name.rsplit("-", 1)[-1]
    log, events, summary = tmp_path / f"{name}.log", tmp_path / f"{name}.events.jsonl", tmp_path / f"{name}.json"
    cmd = [
        sys.executable, "-m", "swarm.cli.node", "start",
        "--listen", f"/ip4/{host.ip}/tcp/{PORT}",
        "--data-dir", str(tmp_path / name),
        "--events-file", str(events),
        *args,
    ]  # fmt: skip
    if bootstrap:
        cmd += ["--initial-peers", bootstrap]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = bed.popen(host, cmd, stdout=out, stderr=out, text=True, env=env)
    node = BedNode(host=host, proc=proc, log=log, events=EventReader(events), summary=summary)
    node.events.wait_for_blocking(ListeningEvent, alive=lambda: proc.poll() is None, timeout_s=60)
    return node


def wait_until(what: str, check: object, nodes: list[BedNode], timeout_s: float) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` (with the nodes' log tails) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        for node in nodes:
            if node.proc.poll() is not None:
                pytest.fail(f"{node.host.name} exited ({node.proc.returncode}): {node.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.host.name}\n{n.log.read_text()[-2500:]}" for n in nodes)
            pytest.fail(f"not within {timeout_s:.0f}s: {what}\n{tails}")
        time.sleep(0.2)


def stop_nodes(nodes: list[BedNode]) -> None:
    """SIGTERM every node, wait for each (a clean stop writes its summary), kill the stragglers."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
        node.events.poll()
        stopped = node.events.first(StoppedEvent)
        assert stopped is None or stopped.error is None, f"{node.host.name}: {stopped.error}"
