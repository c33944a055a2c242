"""The CLIs: `swarm-node local` (real processes), `swarm-node export` and `swarm-dht stages` against a live swarm."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.run.config import RunConfig
from swarm.local.export import ExportConfig, _export
from swarm.model import PipelineModel, build_stages
from tests.training.swarm_harness import Swarm, small_run, stage_weights


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_local_swarm_trains_and_prints_the_json_summary(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli.node",
            "local",
            "--nodes",
            "4",
            "--steps",
            "6",
            "--json",
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
    for key in (
        "steps",
        "initial_loss",
        "final_loss",
        "loss_floor",
        "stages",
        "samples",
        "samples_per_s",
        "elapsed_s",
        "run_dir",
    ):
        assert key in summary
    assert summary["steps"] == 6
    assert summary["final_loss"] < summary["initial_loss"] - 0.3
    # stderr is no terminal here: the view falls back to plain lines, the last one the final state with its peers
    final = [line for line in proc.stderr.splitlines() if line.startswith("final: ")]
    assert len(final) == 1 and final[0].startswith("final: step 6/6"), proc.stderr[-3000:]
    assert re.search(r"stage 0: 2 peers( \([^)]*\))?; stage 1: 2 peers", final[0]), final
    assert summary["loss_floor"] < summary["final_loss"]
    assert [len(s) for s in summary["stages"]] == [2, 2]
    assert all(p.startswith("12D3KooW") for s in summary["stages"] for p in s)
    assert summary["samples"] >= 6 * RunConfig.from_toml().batch.target_batch_size
    assert sorted(p.name for p in (tmp_path / "run").glob("node-*.log")) == [f"node-{i}.log" for i in range(4)]
    assert "stage" in proc.stderr  # the live table went to stderr (stdout keeps the JSON)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_export_gathers_all_stages_and_stages_command_shows_them(tmp_path: Path) -> None:
    run = small_run()
    swarm = Swarm(run)
    try:
        nodes = [await swarm.add(seed=70 + i, stage=i, max_steps=2, record_period_s=30.0) for i in range(2)]
        async with asyncio.timeout(60):
            await asyncio.gather(*(n.task for n in nodes))  # the roles stop at max_steps; transports and DHTs serve on
        out = tmp_path / "model.safetensors"
        steps = await _export(ExportConfig(run=run, initial_peers=(swarm.bootstrap,), out_path=out))
        assert steps == [2, 2]
        model = PipelineModel(build_stages(run))
        model.load_state_dict(load_file(str(out)))
        for stage, node in enumerate(nodes):
            for p, q in zip(model.stages[stage].parameters(), stage_weights(node), strict=False):
                assert torch.equal(p, q)
        config = tmp_path / "run.toml"
        config.write_text(run.to_toml())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from swarm.cli.dht import main; main()",
            "--initial-peers",
            swarm.bootstrap,
            "stages",
            "--config",
            str(config),
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()[-2000:]
        view = json.loads(stdout.decode().strip().splitlines()[-1])
        assert [len(s["peers"]) for s in view["stages"]] == [1, 1]
        assert [s["step"] for s in view["stages"]] == [2, 2]
    finally:
        await swarm.close()
