"""A node process killed with SIGKILL mid-run: the drivers route around it and steps keep advancing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.local.events import E, EventReader, ListeningEvent, ServingEvent
from tests.training.swarm_harness import small_run

DEADLINE_S = 90.0


def _start(tmp_path: Path, i: int, config: Path, bootstrap: str | None) -> tuple[subprocess.Popen[str], Path, Path]:
    log = tmp_path / f"node-{i}.log"
    events = tmp_path / f"node-{i}.events.jsonl"
    args = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "start",
        "--data-dir",
        str(tmp_path / f"n{i}"),
        "--config",
        str(config),
        "--start-after-peers",
        "4",
        "--events-file",
        str(events),
    ]
    if bootstrap:
        args += ["--initial-peers", bootstrap]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            args,
            stdout=err,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
    return proc, log, events


def _wait_event(proc: subprocess.Popen[str], events: EventReader, kind: type[E]) -> E:
    return events.wait_for_blocking(kind, alive=lambda: proc.poll() is None, timeout_s=DEADLINE_S)


def _newest_step(log: Path) -> int:
    steps = [int(m) for m in re.findall(r"step (\d+) done", log.read_text())]
    return max(steps, default=-1)


def _wait_step(log: Path, step: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while _newest_step(log) < step:
        assert time.monotonic() < deadline, f"{log.name} did not reach step {step}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigkilled_stage_peer_is_routed_around(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(small_run().to_toml())
    procs: list[tuple[subprocess.Popen[str], Path, str]] = []
    started: list[subprocess.Popen[str]] = []
    try:
        bootstrap = None
        for i in range(4):
            proc, log, events_path = _start(tmp_path, i, config, bootstrap)
            started.append(proc)
            events = EventReader(events_path)
            maddr = _wait_event(proc, events, ListeningEvent).maddrs[0]
            stage = str(_wait_event(proc, events, ServingEvent).stage)
            bootstrap = bootstrap or maddr
            procs.append((proc, log, stage))
        assert sorted(s for _, _, s in procs) == ["0", "0", "1", "1"]
        survivor_log = next(log for _, log, s in procs if s == "0")
        _wait_step(survivor_log, 1)
        victim = next(p for p, _, s in procs if s == "1")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        _wait_step(survivor_log, _newest_step(survivor_log) + 3)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
