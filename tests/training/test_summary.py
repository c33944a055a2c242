"""`NodeSummary`: the file a node writes when it stops round-trips, keeps the old JSON keys, and a missing or
malformed file is a `SummaryError` that names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.errors import SwarmError
from swarm.training.node_role import Role
from swarm.training.summary import NodeSummary, SummaryError, VerificationSummary

TRAINER = NodeSummary(
    peer_id="12D3KooWtrainer",
    role=Role.AUTO,
    run_id="run",
    step=6,
    elapsed_s=12.5,
    stage=1,
    losses={0: [5.5, 5.25], 10: [3.0]},
    samples=96,
    served_samples=128,
    first_sample_time=1_700_000_000.0,
    end_time=1_700_000_010.0,
    step_times={9: 1_700_000_009.0, 10: 1_700_000_009.75},
    loss_floor=1.25,
    verification=VerificationSummary(misbehave="lazy", orchestrator_candidate=True, attested_windows=[0, 1]),
)
VALIDATOR = NodeSummary(
    peer_id="12D3KooWvalidator",
    role=Role.VALIDATOR,
    run_id="run",
    step=6,
    elapsed_s=3.0,
    checks=10,
    failed=2,
    windows_checked=3,
    states_synced=4,
    attested_windows=[0, 1, 2],
    ledger_path="/tmp/ledger.jsonl",
)


@pytest.mark.parametrize("summary", [TRAINER, VALIDATOR])
def test_round_trip(tmp_path: Path, summary: NodeSummary) -> None:
    path = tmp_path / "summary.json"
    summary.write(path)
    again = NodeSummary.read(path)
    assert again == summary
    assert type(again.role) is Role
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # the temporary file was renamed


def test_the_file_keeps_the_keys_the_launcher_and_older_readers_know(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    TRAINER.write(path)
    obj = json.loads(path.read_text())
    assert obj["role"] == "auto" and obj["peer_id"] == "12D3KooWtrainer" and obj["stage"] == 1
    assert obj["losses"] == {"0": [5.5, 5.25], "10": [3.0]}
    assert obj["step_times"] == {"9": 1_700_000_009.0, "10": 1_700_000_009.75}
    assert obj["verification"]["misbehave"] == "lazy" and obj["verification"]["attested_windows"] == [0, 1]
    assert TRAINER.misbehaving and not VALIDATOR.misbehaving


def test_a_file_in_the_old_hand_written_layout_reads(tmp_path: Path) -> None:
    """What `ValidatorRole.write_summary` wrote before `NodeSummary` (no training keys at all)."""
    old = {
        "peer_id": "12D3KooWv",
        "role": "validator",
        "step": 3,
        "run_id": "r",
        "checks": 4,
        "failed": 0,
        "windows_checked": 1,
        "states_synced": 2,
        "attested_windows": [0],
        "ledger_path": None,
        "elapsed_s": 1.5,
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(old))
    summary = NodeSummary.read(path)
    assert summary.role == Role.VALIDATOR and summary.checks == 4 and summary.losses == {} and summary.stage is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "not valid JSON"),
        ('{"peer_id": "p", "role": "auto"', "not valid JSON"),
        ("[1, 2]", "expected a map"),
        ('{"peer_id": "p", "role": "auto", "run_id": "r", "step": 1}', "missing field 'elapsed_s'"),
        ('{"peer_id": "p", "role": "king", "run_id": "r", "step": 1, "elapsed_s": 1}', "NodeSummary.role"),
        ('{"peer_id": "p", "role": "dht", "run_id": "r", "step": 1, "elapsed_s": 1}', "not allowed"),
        ('{"peer_id": "p", "role": "auto", "run_id": "r", "step": "1", "elapsed_s": 1}', "NodeSummary.step"),
        ('{"peer_id": "p", "role": "auto", "run_id": "r", "step": -1, "elapsed_s": 1}', "step must be >= 0"),
        ('{"peer_id": "p", "role": "auto", "run_id": "r", "step": 1, "elapsed_s": 1, "x": 1}', "unknown fields"),
        ('{"peer_id": "p", "role": "auto", "run_id": "r", "step": 1, "elapsed_s": 1, "losses": {"a": []}}', "step"),
    ],
)
def test_a_malformed_file_is_a_summary_error_naming_it(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.raises(SummaryError, match=match) as caught:
        NodeSummary.read(path)
    assert str(path) in str(caught.value) and isinstance(caught.value, SwarmError)


def test_a_missing_file_is_a_summary_error(tmp_path: Path) -> None:
    with pytest.raises(SummaryError, match="no node summary at"):
        NodeSummary.read(tmp_path / "nope.json")
