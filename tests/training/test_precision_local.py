"""`swarm-node local --set precision.compute=bf16`: a real 2-node swarm trains in bf16 (activations bf16 on the
wire between the processes) with the device ``auto`` resolved and reported."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.model.devices import resolve_device
from swarm.run.config import RunConfig
from swarm.training.summary import NodeSummary


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_local_swarm_trains_in_bf16(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--nodes", "2", "--steps", "3", "--json", "--set", "precision.compute=bf16", "--run-dir", str(run_dir)]
    proc = subprocess.run(
        [sys.executable, "-m", "swarm.cli.node", "local", *args, "--timeout", "200"],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == 3
    assert summary["precision"] == "bf16"
    assert summary["devices"] == [resolve_device("auto")]  # swarm-node local's nodes use --device auto
    assert summary["run_id"] == RunConfig.load(None, ["precision.compute=bf16"]).run_id != RunConfig.load().run_id
    assert summary["loss_curve"] and all(math.isfinite(x) for x in summary["loss_curve"])
    assert summary["final_loss"] < summary["initial_loss"]
    nodes = [NodeSummary.read(run_dir / f"node-{i}" / "summary.json") for i in range(2)]
    assert {n.stage for n in nodes} == {0, 1}  # the activations crossed between the two processes
    assert all(n.device == resolve_device("auto") and n.precision == "bf16" for n in nodes)
