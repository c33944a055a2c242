"""A swarm trains on token shards end to end; a node whose shard is damaged refuses to start before it listens."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from swarm.data import bind_data
from swarm.data.manifest import load_manifest
from swarm.run.config import RunConfig
from tests.data.corpus import shards_run_toml


def _run_file(tmp_path: Path, manifest: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(shards_run_toml(manifest))
    return path


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_local_swarm_trains_on_token_shards(tmp_path: Path, shards: Path) -> None:
    run_file = _run_file(tmp_path, shards)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli.node",
            "local",
            "--nodes",
            "2",
            "--steps",
            "3",
            "--json",
            "--config",
            str(run_file),
            "--run-dir",
            str(tmp_path / "run"),
            "--timeout",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == 3
    assert summary["loss_floor"] is None
    assert summary["initial_loss"] == pytest.approx(6.24, abs=0.5)  # about ln(512) at the random init
    bound = bind_data(RunConfig.from_dict(tomllib.loads(run_file.read_text())))
    assert summary["run_id"] == bound.run_id  # the data's hashes are in the run id every node used


@pytest.mark.timeout(120)
def test_a_node_with_a_damaged_shard_refuses_to_start(tmp_path: Path, shards: Path) -> None:
    shard = shards.parent / load_manifest(shards).split("train")[0].file
    shard.write_bytes(shard.read_bytes()[:100])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli.node",
            "start",
            "--config",
            str(_run_file(tmp_path, shards)),
            "--data-dir",
            str(tmp_path / "node"),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "listening on" not in proc.stdout  # refused before it listened
    assert str(shard) in proc.stderr and "truncated" in proc.stderr and "swarm-data prepare" in proc.stderr
