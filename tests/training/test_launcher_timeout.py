"""`swarm-node local --timeout`: a run that does not finish in time ends with a JSON summary naming the stuck
nodes (and their log tails on stderr), exit code 1, and no process left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_past_its_timeout_reports_the_stuck_nodes_and_stops_them(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "local",
        "--nodes",
        "2",
        "--steps",
        "100000",
        "--json",
        "--run-dir",
        str(tmp_path / "run"),
        "--timeout",
        "20",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False
    assert "did not finish within --timeout 20s" in summary["error"]
    assert "nodes still running" in summary["error"]
    assert "Traceback" not in proc.stderr
    assert "lines of node-0.log" in proc.stderr
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "run") in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
