"""A swarm of processes with two validators (both orchestrator candidates): SIGKILL the leader once it has
attested a window; the other takes over, and across both ledgers every window is attested exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.local.events import E, EventReader, ListeningEvent, NodeEventError, ServingEvent
from swarm.run.config import RunConfig
from swarm.training.verifying import ledger_path_for
from swarm.verification.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "swarm" / "run" / "presets" / "tiny_gpt_checked.toml"
NUM_TRAINERS, NUM_VALIDATORS, MAX_STEPS = 4, 2, 40


def _start(folder: Path, extra: list[str], bootstrap: str | None) -> subprocess.Popen[str]:
    folder.mkdir(parents=True)
    args = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "start",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data-dir",
        str(folder),
        "--config",
        str(CONFIG),
        "--max-steps",
        str(MAX_STEPS),
        "--summary-file",
        str(folder / "summary.json"),
        "--start-after-peers",
        str(NUM_TRAINERS + NUM_VALIDATORS),
        "--events-file",
        str(folder / "events.jsonl"),
        *extra,
    ]
    if bootstrap:
        args += ["--initial-peers", bootstrap]
    with open(folder / "node.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=log,
            text=True,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )


def _wait_event(proc: subprocess.Popen[str], events: EventReader, kind: type[E], deadline: float) -> E:
    try:
        return events.wait_for_blocking(
            kind, alive=lambda: proc.poll() is None, timeout_s=max(deadline - time.monotonic(), 0.0)
        )
    except NodeEventError:
        raise AssertionError(f"node exited with {proc.wait(timeout=10)} before reporting {kind.KIND!r}") from None


def _attested(ledger: Path, run_id: str) -> list[int]:
    return [a.window for a in Ledger(ledger).read() if a.run_id == run_id] if ledger.exists() else []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_orchestrator_is_replaced_and_every_window_is_attested_once(tmp_path: Path) -> None:
    run_id = RunConfig.from_toml(CONFIG).run_id
    procs: list[subprocess.Popen[str]] = []
    deadline = time.monotonic() + 540
    try:
        bootstrap: str | None = None
        for i in range(NUM_TRAINERS + NUM_VALIDATORS):
            role = ["--role", "validator"] if i >= NUM_TRAINERS else []
            proc = _start(tmp_path / f"node-{i}", role, bootstrap)
            procs.append(proc)
            events = EventReader(tmp_path / f"node-{i}" / "events.jsonl")
            maddr = _wait_event(proc, events, ListeningEvent, deadline).maddrs[0]
            bootstrap = bootstrap or maddr
            if not role:
                _wait_event(proc, events, ServingEvent, deadline)
        ledgers = {i: ledger_path_for(tmp_path / f"node-{i}", run_id) for i in range(NUM_TRAINERS, len(procs))}
        leader = None
        while leader is None and time.monotonic() < deadline:  # the first validator to attest is the leader
            leader = next((i for i, path in ledgers.items() if _attested(path, run_id)), None)
            time.sleep(0.05)
        assert leader is not None, "no attestation before the deadline"
        os.killpg(procs[leader].pid, signal.SIGKILL)
        procs[leader].wait(timeout=30)
        for i, proc in enumerate(procs):
            if i != leader:
                assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, f"node {i} failed"
        windows = sorted(w for path in ledgers.values() for w in _attested(path, run_id))
        survivor = next(i for i in ledgers if i != leader)
        last = RunConfig.from_toml(CONFIG).verification.last_attestable_window(MAX_STEPS)
        assert windows == list(range(last + 1)), windows  # none skipped, none attested twice
        assert _attested(ledgers[survivor], run_id), "the surviving candidate never took over"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
