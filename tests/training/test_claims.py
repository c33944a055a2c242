"""The step-claim rule (`swarm.training.claims`): which step a node believes from whose records."""

from __future__ import annotations

from swarm.p2p.identity import Identity, PeerID
from swarm.training.claims import CLAIM_SLACK_STEPS, REPORT_LEAD_STEPS, StepEvidence, quorum, step_evidence
from swarm.training.messages import PeerRecord
from swarm.training.node_role import Role
from swarm.training.progress import ProgressRecord

TARGET = 64
ME, A, B, C, D = (Identity.from_seed(bytes([i + 1]) * 32).peer_id for i in range(5))


def stage_record(stage: int | None, step: int) -> PeerRecord:
    return PeerRecord(role=Role.AUTO, stage=stage, maddrs=[], throughput=1.0, step=step, config_hash="h")


def progress(step: int, samples: int = 16) -> ProgressRecord:
    return ProgressRecord(step=step, samples=samples, samples_per_s=1.0)


def evidence(
    peers: dict[PeerID, PeerRecord],
    prog: dict[PeerID, ProgressRecord] | None = None,
    *,
    exclude: frozenset[PeerID] = frozenset(),
    own_step: int | None = None,
) -> StepEvidence:
    return step_evidence(peers, prog or {}, me=ME, exclude=exclude, target_batch_size=TARGET, own_step=own_step)


def test_quorum_is_two_distinct_peers_or_the_only_one() -> None:
    assert [quorum(n) for n in range(5)] == [0, 1, 2, 2, 2]


def test_one_peer_far_ahead_is_not_believed_while_others_are_there() -> None:
    peers = {A: stage_record(0, 100_000), B: stage_record(0, 68), C: stage_record(1, 68)}
    prog = {A: progress(100_000), B: progress(68)}
    ev = evidence(peers, prog)
    assert ev.believed == 68
    assert ev.unbacked() == {A}
    assert not ev.backs(100_000) and ev.backs(68 + CLAIM_SLACK_STEPS)
    assert ev.to_report(own_step=68) == {A: 100_000}


def test_two_peers_back_a_step_when_the_samples_do() -> None:
    peers = {A: stage_record(0, 70), B: stage_record(1, 70), C: stage_record(1, 50)}
    assert evidence(peers, {A: progress(70)}).believed == 70


def test_own_records_never_count() -> None:
    """A record of this PeerID (a previous life's) is neither a claim nor a driver."""
    peers = {ME: stage_record(0, 500), A: stage_record(1, 40)}
    ev = evidence(peers, {ME: progress(500, samples=TARGET)})
    assert ev.believed == 40 and set(ev.claims) == {A}


def test_without_other_peers_nothing_is_believed_or_doubted() -> None:
    ev = evidence({ME: stage_record(0, 9)})
    assert ev.believed is None and ev.backs(1_000_000) and ev.to_report(0) == {}


def test_a_lone_other_peer_is_a_majority_of_one() -> None:
    """A node joining a stage left empty takes the step of the only other peer (its drivers' samples back it)."""
    assert evidence({A: stage_record(0, 68)}, {A: progress(68)}).believed == 68


def test_claims_beyond_the_drivers_samples_are_not_believed() -> None:
    """Two stage peers claim step 100000, but the only driver feeds step 68 and never completed a later one."""
    peers = {A: stage_record(1, 100_000), B: stage_record(1, 100_000), C: stage_record(0, 68)}
    ev = evidence(peers, {C: progress(68, samples=16)})
    assert ev.believed == 68 and ev.unbacked() == {A, B}


def test_a_completed_step_backs_the_next() -> None:
    """Progress records at step 68 adding up to the target back step 69 (the stages close 68 then)."""
    peers = {A: stage_record(1, 69), B: stage_record(1, 69), C: stage_record(0, 68)}
    prog = {C: progress(68, samples=TARGET // 2), D: progress(68, samples=TARGET // 2)}
    assert evidence(peers, prog).believed == 69
    short = {C: progress(68, samples=TARGET // 2), D: progress(68, samples=TARGET // 2 - 1)}
    assert evidence(peers, short).believed == 68


def test_a_driving_node_backs_its_own_next_step_only() -> None:
    """This node is the only driver (at step 68): two other peers claiming 100000 are not believed."""
    peers = {A: stage_record(1, 100_000), B: stage_record(1, 100_000)}
    assert evidence(peers, own_step=68).believed == 69
    assert evidence(peers).believed == 100_000  # without any driver's samples: the peers alone decide


def test_trainer_and_validator_records_do_not_echo_claims() -> None:
    """Peers serving no stage only repeat the stages' steps: their peer-record step is no claim of their own."""
    peers = {A: stage_record(0, 100_000), B: stage_record(None, 100_000), C: stage_record(1, 10)}
    assert evidence(peers).believed == 10


def test_offenders_are_left_out() -> None:
    peers = {A: stage_record(0, 100_000), B: stage_record(0, 100_000), C: stage_record(1, 10)}
    assert evidence(peers, exclude=frozenset({A})).believed == 10


def test_honest_peers_a_little_ahead_are_not_reported() -> None:
    """A peer a few steps ahead (it closed first, or this node is behind) is never reported; the report needs a
    claim more than REPORT_LEAD_STEPS ahead of both the believed step and this node's own step."""
    peers = {A: stage_record(0, 50 + REPORT_LEAD_STEPS), B: stage_record(1, 50), C: stage_record(1, 0)}
    ev = evidence(peers)
    assert ev.believed == 50 and ev.to_report(own_step=0) == {}
    joiner = {A: stage_record(0, 50), B: stage_record(1, 0)}  # seen from a node at 50: the joiner lowers the quorum
    assert evidence(joiner).to_report(own_step=50) == {}
