"""`Role`: parsed from the command line and the wire with a clear error; the plain strings stay on the wire."""

from __future__ import annotations

import json

import pytest

from swarm.errors import ConfigError, ProtocolError
from swarm.p2p.messages import unpackb
from swarm.run.config import RunConfig
from swarm.training.messages import PeerRecord
from swarm.training.node_role import PEER_RECORD_ROLES, TRAINING_ROLES, Role
from swarm.training.training_config import TrainingConfig
from swarm.verification.election import ElectionRole
from swarm.verification.orchestrator import OrchestratorConfig


def test_parse_accepts_the_strings_and_the_members() -> None:
    assert [Role.parse(name) for name in ("auto", "server", "trainer", "validator", "dht")] == list(Role)
    assert Role.parse(Role.TRAINER) is Role.TRAINER
    assert [r for r in Role if r.trains] == [Role.AUTO, Role.SERVER, Role.TRAINER]


@pytest.mark.parametrize("value", ["king", "", "AUTO", None, 1])
def test_parse_rejects_anything_else_naming_the_choices(value: object) -> None:
    with pytest.raises(ConfigError, match=r"unknown role .*; use one of auto, server, trainer, validator, dht"):
        Role.parse(value)


def test_parse_with_allowed_roles() -> None:
    with pytest.raises(ConfigError, match="role 'validator' is not allowed here; use one of auto, server, trainer"):
        Role.parse("validator", allowed=TRAINING_ROLES)
    assert Role.parse("validator", allowed=PEER_RECORD_ROLES) is Role.VALIDATOR


def test_the_strings_stay_on_the_wire_and_in_json() -> None:
    record = PeerRecord(role=Role.SERVER, stage=0, maddrs=[], throughput=1.0, step=0, config_hash="h")
    assert unpackb(record.pack())["role"] == "server" and json.dumps({"role": Role.SERVER}) == '{"role": "server"}'
    again = PeerRecord.unpack(record.pack())
    assert again == record and type(again.role) is Role
    parsed = PeerRecord(role="trainer", stage=None, maddrs=[], throughput=0.0, step=0, config_hash="h")  # type: ignore[arg-type]
    assert parsed.role is Role.TRAINER


@pytest.mark.parametrize("role", ["king", "dht"])
def test_a_peer_record_with_a_bad_role_is_a_protocol_error(role: str) -> None:
    wire = PeerRecord(role=Role.AUTO, stage=0, maddrs=[], throughput=1.0, step=0, config_hash="h").to_wire()
    wire["role"] = role
    with pytest.raises(ProtocolError, match="role"):
        PeerRecord.from_wire(wire)


def test_training_config_takes_training_roles_only() -> None:
    assert TrainingConfig(run=RunConfig(), role="trainer").role is Role.TRAINER  # type: ignore[arg-type]
    for bad in ("validator", "dht", "king"):
        with pytest.raises(ConfigError, match="role"):
            TrainingConfig(run=RunConfig(), role=bad)  # type: ignore[arg-type]


def test_election_roles_are_an_enum_too() -> None:
    assert ElectionRole.parse("candidate") is ElectionRole.CANDIDATE
    assert OrchestratorConfig(run_id="r", role="validator").role is ElectionRole.VALIDATOR  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"role must be one of \['validator', 'candidate'\], got 'auto'"):
        ElectionRole.parse("auto")
