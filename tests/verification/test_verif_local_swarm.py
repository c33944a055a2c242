"""`swarm-node local --validators 1 --misbehave lazy:1`: a real swarm of processes flags the cheater and attests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_local(tmp_path: Path, args: list[str], *, timeout_s: int) -> dict[str, Any]:
    """`swarm-node local ... --json` in ``tmp_path/run``; its summary, checked to be ok (with the log tail)."""
    cmd = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "local",
        *args,
        "--json",
        "--run-dir",
        str(tmp_path / "run"),
        "--timeout",
        str(timeout_s - 20),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["logs"] = proc.stderr[-6000:]
    assert summary["ok"], summary
    return summary


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_swarm_flags_exactly_the_lazy_node(tmp_path: Path) -> None:
    # the example run, sampling 60% of receipts instead of 30%: the chance that no receipt of the lazy node is
    # checked in two windows drops from about 1e-3 to below 1e-8, so this test does not flake on sampling luck
    example = (REPO / "swarm" / "run" / "presets" / "tiny_gpt_checked.toml").read_text()
    if "sample_probability = 0.3" not in example:
        raise AssertionError("swarm/run/presets/tiny_gpt_checked.toml changed: update this test")
    config = tmp_path / "checked.toml"
    config.write_text(example.replace("sample_probability = 0.3", "sample_probability = 0.6"))
    summary = _run_local(
        tmp_path,
        ["--nodes", "4", "--validators", "1", "--misbehave", "lazy:1", "--steps", "15", "--config", str(config)],
        timeout_s=400,
    )
    logs = summary.pop("logs")
    assert len(summary["misbehaving"]) == 1
    assert summary["flagged"] == summary["misbehaving"], (summary, logs)
    assert summary["attestations"] >= 2, (summary, logs)
    assert summary["rewards"] and sum(summary["rewards"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_swarm_flags_exactly_the_sign_flip_and_replay_nodes(tmp_path: Path) -> None:
    """6 nodes (3 per stage) with CenteredClip: the all-reduce owners report the x(-1000) sender as an outlier
    and the replayer's repeated parts; both are flagged (paid nothing from their first flagged window on, which
    the attestation tests check), nobody else is."""
    summary = _run_local(
        tmp_path,
        [
            "--nodes",
            "6",
            "--validators",
            "1",
            "--misbehave",
            "sign-flip:1",
            "--misbehave",
            "replay:1",
            "--steps",
            "20",
            "--config",
            str(REPO / "swarm" / "run" / "presets" / "tiny_gpt_robust.toml"),
        ],
        timeout_s=580,
    )
    logs = summary.pop("logs")
    assert len(summary["misbehaving"]) == 2
    assert summary["flagged"] == summary["misbehaving"], (summary, logs)
    assert sum(summary["rewards"].values()) == pytest.approx(1.0, abs=1e-4)
