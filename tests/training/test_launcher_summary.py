"""`swarm-node local`'s run summary is aggregated from the nodes' `NodeSummary` files; a malformed one is left out
with a warning (the run is then not ok), a missing one too."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from swarm.local.launcher import LaunchConfig, NodeProcess, _summarize
from swarm.run.config import RunConfig
from swarm.training.node_role import Role
from swarm.p2p.traffic import TrafficSnapshot
from swarm.training.summary import NodeSummary, TrafficSummary, VerificationSummary


def _trainer(
    peer: str, stage: int, losses: dict[int, list[float]], *, step: int = 2, cheat: str | None = None
) -> NodeSummary:
    return NodeSummary(
        peer_id=peer,
        role=Role.AUTO,
        run_id="r",
        step=step,
        elapsed_s=5.0,
        stage=stage,
        losses=losses,
        samples=10,
        first_sample_time=100.0,
        end_time=110.0,
        verification=VerificationSummary(misbehave=cheat),
    )


async def _nodes(tmp_path: Path, count: int) -> list[NodeProcess]:
    done = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    async with asyncio.timeout(30):
        await done.wait()
    nodes = [NodeProcess(index=i, proc=done, folder=tmp_path / f"node-{i}") for i in range(count)]
    for node in nodes:
        node.folder.mkdir()
    return nodes


async def test_the_run_summary_comes_from_the_node_summaries(tmp_path: Path) -> None:
    nodes = await _nodes(tmp_path, 4)
    _trainer("A", 0, {0: [4.0], 1: [3.0]}).write(nodes[0].folder / "summary.json")
    _trainer("B", 1, {0: [2.0]}, step=1, cheat="lazy").write(nodes[1].folder / "summary.json")
    NodeSummary(peer_id="V", role=Role.VALIDATOR, run_id="r", step=0, elapsed_s=1.0).write(
        nodes[2].folder / "summary.json"
    )
    _trainer("C", 1, {1: [1.0]}).write(nodes[3].folder / "summary.json")
    cfg = LaunchConfig(num_nodes=3, num_validators=1, steps=2, run_dir=tmp_path)
    summary = _summarize(cfg, RunConfig(), tmp_path, nodes)
    assert summary["ok"] and summary["steps"] == 2  # the validator's and the cheater's steps do not count
    assert summary["loss_curve"] == [3.0, 2.0] and summary["stages"] == [["A"], ["B", "C"]]
    assert summary["misbehaving"] == ["B"] and summary["samples"] == 30 and summary["elapsed_s"] == 10.0


async def test_a_malformed_or_missing_node_summary_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = await _nodes(tmp_path, 3)
    _trainer("A", 0, {0: [4.0]}).write(nodes[0].folder / "summary.json")
    (nodes[1].folder / "summary.json").write_text('{"peer_id": "B", "role": "auto"')  # cut short
    cfg = LaunchConfig(num_nodes=3, steps=2, run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="swarm.local.launcher"):
        summary = _summarize(cfg, RunConfig(), tmp_path, nodes)
    assert not summary["ok"] and summary["stages"][0] == ["A"]
    assert "node 1: the node summary" in caplog.text and "is not valid JSON" in caplog.text


async def test_the_run_summary_adds_the_nodes_bytes_per_step_per_family(tmp_path: Path) -> None:
    nodes = await _nodes(tmp_path, 2)
    a = TrafficSnapshot({"stage": 1000, "avg": 400, "dht": 10}, {"stage": 900, "avg": 400}, {"stage.tied": 40})
    b = TrafficSnapshot({"stage": 900, "avg": 400}, {"stage": 1000, "avg": 400, "dht": 10})
    for node, counted, peer in ((nodes[0], a, "A"), (nodes[1], b, "B")):
        summary = _trainer(peer, 0, {0: [1.0]})
        summary = NodeSummary.from_json({**summary.to_json(), "traffic": TrafficSummary.of(counted, 4).to_wire()})
        summary.write(node.folder / "summary.json")
    back = NodeSummary.read(nodes[0].folder / "summary.json")
    assert back.traffic is not None and back.traffic.sent_bytes_per_step == {"avg": 100.0, "dht": 2.5, "stage": 250.0}
    cfg = LaunchConfig(num_nodes=2, steps=2, run_dir=tmp_path)
    traffic = _summarize(cfg, RunConfig(), tmp_path, nodes)["traffic"]
    assert traffic["sent_bytes"] == {"avg": 800, "dht": 10, "stage": 1900}
    assert traffic["received_bytes"] == {"avg": 800, "dht": 10, "stage": 1900}
    assert traffic["sent_bytes_per_step"] == {"avg": 200.0, "dht": 2.5, "stage": 475.0}
    assert traffic["received_bytes_per_step"] == traffic["sent_bytes_per_step"]
    assert traffic["method_sent_bytes_per_step"] == {"stage.tied": 10.0}


def test_a_traffic_summary_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="steps"):
        TrafficSummary(steps=-1)
    with pytest.raises(ValueError, match="byte counts"):
        TrafficSummary(steps=1, sent_bytes={"stage": -5})
    assert TrafficSummary.of(TrafficSnapshot({"stage": 7}, {}), 0).sent_bytes_per_step == {"stage": 7.0}
