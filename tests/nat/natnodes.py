"""`swarm-node start` processes inside the NAT bed's namespaces, and waiting on their events."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.node import IDENTITY_FILE_NAME
from swarm.p2p.identity import Identity
from swarm.local.events import EventReader, ListeningEvent, ServingEvent, ReachabilityEvent, StoppedEvent
from swarm.testing.natbed import Host, NatBed, unavailable_reason
from swarm.testing.natwan import NatWanBed

AnyNatBed = NatBed | NatWanBed  # the plain NAT bed, or the one on emulated WAN links

PORT = 4001
# Import the node (seconds: torch) at once, then wait until the bootstrap node serves (the test creates the file
# named first), then run it: nodes import in parallel, and each joins through a node that is up.
_AFTER_BOOTSTRAP = """
import sys, time
from pathlib import Path
from swarm.cli.node import main
ready, deadline = Path(sys.argv[1]), time.monotonic() + 120
while not ready.exists():
    if time.monotonic() > deadline:
        raise SystemExit(f"{ready} did not appear")
    time.sleep(0.1)
sys.argv = ["swarm-node", *sys.argv[2:]]
main()
"""


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


def bootstrap_maddr(host: Host, tmp_path: Path) -> str:
    """The multiaddr ``host``'s node will listen at: its identity is made here, before it starts, so every
    node can start at once (each start imports torch: seconds on a busy machine)."""
    data_dir = tmp_path / host.name.rsplit("-", 1)[-1]
    data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.from_seed(hashlib.sha256(host.name.encode()).digest())
    identity.save(data_dir / IDENTITY_FILE_NAME)
    return f"/ip4/{host.ip}/tcp/{PORT}/p2p/{identity.peer_id.to_base58()}"


def start_nodes(
    bed: AnyNatBed, tmp_path: Path, specs: list[tuple[Host, list[str]]], bootstrap: str, *, light: bool = False
) -> list[BedNode]:
    """Start a node per (host, extra args), all joining through ``bootstrap``; wait until each listens. Full
    nodes start at once (see _AFTER_BOOTSTRAP); light ones (`tests.nat.lightnode`) after the bootstrap node."""
    nodes = []
    ready = tmp_path / "bootstrap-serving"
    for host, args in specs:
        own = bootstrap.startswith(f"/ip4/{host.ip}/")
        nodes.append(launch_node(bed, host, tmp_path, args, None if own else bootstrap, light=light))
        if own and light:
            _wait_listening(nodes[-1])
    if not light:
        first = next(n for n in nodes if bootstrap.startswith(f"/ip4/{n.host.ip}/"))
        first.events.wait_for_blocking(ServingEvent, alive=lambda: first.proc.poll() is None, timeout_s=120)
        ready.touch()
    for node in nodes:
        _wait_listening(node)
    return nodes


def _wait_listening(node: BedNode) -> None:
    node.events.wait_for_blocking(ListeningEvent, alive=lambda: node.proc.poll() is None, timeout_s=90)


def launch_node(
    bed: AnyNatBed, host: Host, tmp_path: Path, args: list[str], bootstrap: str | None = None, *, light: bool = False
) -> BedNode:
    name = host.name.rsplit("-", 1)[-1]
    log, events, summary = tmp_path / f"{name}.log", tmp_path / f"{name}.events.jsonl", tmp_path / f"{name}.json"
    if light:
        head = [sys.executable, "-m", "tests.nat.lightnode"] + (["--initial-peers", bootstrap] if bootstrap else [])
    elif bootstrap:
        ready = tmp_path / "bootstrap-serving"
        head = [sys.executable, "-c", _AFTER_BOOTSTRAP, str(ready), "start", "--initial-peers", bootstrap]
    else:
        head = [sys.executable, "-m", "swarm.cli.node", "start"]
    cmd = [
        *head,
        "--listen", f"/ip4/{host.ip}/tcp/{PORT}",
        "--data-dir", str(tmp_path / name),
        "--events-file", str(events),
        *([] if light else ["--summary-file", str(summary)]),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = bed.popen(host, cmd, stdout=out, stderr=out, text=True, env=env)
    return BedNode(host=host, proc=proc, log=log, events=EventReader(events), summary=summary)


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
