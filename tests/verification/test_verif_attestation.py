"""Rewards, attestations and the ledger: shares, flags, Sybil neutrality, signatures, replay, tampering."""

from __future__ import annotations

import dataclasses
import json

import pytest
from verif_helpers import MemoryStore, make_identity

from swarm.p2p.identity import Identity
from swarm.errors import ConfigError, VerificationError
from swarm.dht.keys import attestation_key, owner_subkey
from swarm.verification.attestation import (
    GENESIS_DIGEST,
    Attestation,
    ShareEntry,
    build_attestation,
    fetch_attestations,
    pick_attestation,
    publish_attestation,
    verify_attestation,
)
from swarm.verification.common import digest_parts
from swarm.verification.ledger import Ledger
from swarm.verification.receipts import ReceiptBatch, WorkClaim, WorkReceipt, forge_receipt, sign_ack, sign_receipt
from swarm.verification.rewards import RewardConfig, compute_rewards
from swarm.verification.verdicts import VerdictBatch, sign_verdict

RUN = "run-att"
CFG = RewardConfig(window_steps=10, stage_costs=(1.0, 3.0), backward_cost=2.0)


def receipt(
    server: Identity,
    caller: Identity,
    *,
    step: int,
    stage: int = 0,
    kind: str = "forward",
    samples: int = 4,
    mb: str = "mb",
) -> WorkReceipt:
    claim = WorkClaim(
        run_id=RUN,
        step=step,
        stage=stage,
        server=server.peer_id.to_bytes(),
        caller=caller.peer_id.to_bytes(),
        microbatch_id=f"{mb}-{step}-{kind}",
        kind=kind,
        input_hash=digest_parts([mb.encode()]),
        output_hash=digest_parts([kind.encode()]),
        num_samples=samples,
    )
    return sign_receipt(caller, claim, sign_ack(server, claim))


def batch(caller: Identity, receipts: list[WorkReceipt], window: int = 0) -> ReceiptBatch:
    return ReceiptBatch(run_id=RUN, window=window, publisher=caller.peer_id.to_bytes(), receipts=receipts)


def test_shares_follow_stage_cost_and_kind(identities):
    a, b, caller = identities[:3]
    receipts = [
        receipt(a, caller, step=1, stage=0, mb="x"),
        receipt(b, caller, step=1, stage=1, mb="y"),
        receipt(a, caller, step=2, stage=0, kind="backward", mb="z"),
    ]
    out = compute_rewards(RUN, 0, {caller.peer_id: batch(caller, receipts)}, {}, [], CFG)
    assert out.work == {a.peer_id: 4 * 1.0 + 4 * 2.0, b.peer_id: 4 * 3.0}
    assert out.shares == pytest.approx({a.peer_id: 0.5, b.peer_id: 0.5})
    # duplicates, other windows and other runs count nothing
    extra = [*receipts, receipts[0], receipt(a, caller, step=15, mb="late")]
    assert compute_rewards(RUN, 0, {caller.peer_id: batch(caller, extra)}, {}, [], CFG).work == out.work


def test_three_identities_earn_what_one_does(identities):
    """One machine's work under 3 identities earns the same total as under one identity (Sybil-neutral)."""
    honest, machine, caller = identities[:3]
    sybils = [make_identity(f"sybil-{i}") for i in range(3)]
    work = [(honest, 30), (machine, 30)]
    one = [receipt(s, caller, step=i % 10, mb=f"{s.peer_id.short()}-{i}") for s, n in work for i in range(n)]
    split = [receipt(honest, caller, step=i % 10, mb=f"h-{i}") for i in range(30)]
    split += [receipt(sybils[i % 3], caller, step=i % 10, mb=f"s-{i}") for i in range(30)]
    shares_one = compute_rewards(RUN, 0, {caller.peer_id: batch(caller, one)}, {}, [], CFG).shares
    shares_split = compute_rewards(RUN, 0, {caller.peer_id: batch(caller, split)}, {}, [], CFG).shares
    assert sum(shares_split[s.peer_id] for s in sybils) == pytest.approx(shares_one[machine.peer_id], rel=0.05)
    assert shares_split[honest.peer_id] == pytest.approx(shares_one[honest.peer_id], rel=0.05)


def test_invalid_receipts_flag_their_publisher_and_count_nothing(identities):
    a, forger = identities[:2]
    claim = WorkClaim(**{**receipt(a, forger, step=1).claim.__dict__, "server": forger.peer_id.to_bytes()})
    self_signed = sign_receipt(forger, claim, sign_ack(forger, claim))
    out = compute_rewards(RUN, 0, {forger.peer_id: batch(forger, [self_signed])}, {}, [], CFG)
    assert out.flagged == {forger.peer_id} and out.work == {} and out.shares == {}
    bad_ack = forge_receipt(forger, receipt(a, forger, step=2).claim, forger.sign(b"nothing"))
    out = compute_rewards(RUN, 0, {forger.peer_id: batch(forger, [bad_ack])}, {}, [], CFG)
    assert out.flagged == {forger.peer_id} and a.peer_id not in out.work


def test_failed_verdict_zeroes_the_subject_and_flags_stick(identities):
    a, b, caller, validator, outsider = identities[:5]
    ra, rb = receipt(a, caller, step=1, mb="a"), receipt(b, caller, step=1, mb="b")
    receipts = {caller.peer_id: batch(caller, [ra, rb])}
    fail = sign_verdict(
        validator,
        run_id=RUN,
        window=0,
        step=1,
        subject=b.peer_id,
        receipt_id=rb.receipt_id,
        passed=False,
        reason="cosine 0.1 < 0.99",
    )
    verdicts = {
        validator.peer_id: VerdictBatch(run_id=RUN, window=0, publisher=validator.peer_id.to_bytes(), verdicts=[fail])
    }
    out = compute_rewards(RUN, 0, receipts, verdicts, [], CFG)
    assert out.flagged == {b.peer_id} and out.shares == {a.peer_id: 1.0, b.peer_id: 0.0}
    assert len(out.verdict_ids) == 1
    later = compute_rewards(
        RUN, 1, {caller.peer_id: batch(caller, [receipt(b, caller, step=11)], 1)}, {}, out.flagged, CFG
    )
    assert later.flagged == {b.peer_id} and later.shares == {}
    # an untrusted validator, or a verdict naming a peer other than the receipt's server, changes nothing
    trusted = dataclasses.replace(CFG, trusted_validators=(outsider.peer_id.to_base58(),))
    assert compute_rewards(RUN, 0, receipts, verdicts, [], trusted).flagged == set()
    wrong = sign_verdict(
        validator,
        run_id=RUN,
        window=0,
        step=1,
        subject=a.peer_id,
        receipt_id=rb.receipt_id,
        passed=False,
        reason="framing",
    )
    verdicts_wrong = {validator.peer_id: dataclasses.replace(verdicts[validator.peer_id], verdicts=[wrong])}
    assert compute_rewards(RUN, 0, receipts, verdicts_wrong, [], CFG).flagged == set()


def attest(
    orch: Identity, window: int, receipts: dict, verdicts: dict, prev: Attestation | None, term: int = 1
) -> Attestation:
    flagged = [] if prev is None else [make_peer(p) for p in prev.flagged]
    out = compute_rewards(RUN, window, receipts, verdicts, flagged, CFG)
    return build_attestation(
        orch,
        run_id=RUN,
        window=window,
        term=term,
        cfg=CFG,
        outcome=out,
        receipts=receipts,
        verdicts=verdicts,
        prev_digest=prev.digest if prev else GENESIS_DIGEST,
        issued_at=100.0 + window,
    )


def make_peer(raw: bytes):
    from swarm.p2p.identity import PeerID

    return PeerID(raw)


def test_attestation_verifies_and_tampering_fails(identities):
    a, b, caller, orch, other = identities[:5]
    receipts = {caller.peer_id: batch(caller, [receipt(a, caller, step=1, mb="a"), receipt(b, caller, step=2, mb="b")])}
    att = attest(orch, 0, receipts, {}, None)
    assert verify_attestation(att, run_id=RUN, window=0, prev=None, receipts=receipts, verdicts={}) == []
    assert Attestation.unpack(att.pack()) == att
    # tampered: a share moved, signature kept
    moved = [dataclasses.replace(att.shares[0], share=0.9), dataclasses.replace(att.shares[1], share=0.1)]
    tampered = dataclasses.replace(att, shares=moved)
    assert (
        "signature does not verify"
        in verify_attestation(tampered, run_id=RUN, window=0, prev=None, receipts=receipts, verdicts={})[0]
    )
    # re-signed by someone else under the orchestrator's name
    forged = dataclasses.replace(att, signature=other.sign(att.body()))
    assert verify_attestation(forged, run_id=RUN, window=0, prev=None, receipts=receipts, verdicts={})
    # correctly signed by a dishonest orchestrator but not following from the evidence
    unsigned = dataclasses.replace(att, shares=moved)
    dishonest = dataclasses.replace(unsigned, signature=orch.sign(unsigned.body()))
    problems = verify_attestation(dishonest, run_id=RUN, window=0, prev=None, receipts=receipts, verdicts={})
    assert any("work/share" in p for p in problems)
    bad_sum = dataclasses.replace(att, shares=[ShareEntry(peer=e.peer, work=e.work, share=0.7) for e in att.shares])
    bad_sum = dataclasses.replace(bad_sum, signature=orch.sign(bad_sum.body()))
    assert any(
        "sum to" in p
        for p in verify_attestation(bad_sum, run_id=RUN, window=0, prev=None, receipts=receipts, verdicts={})
    )
    # the evidence changed after the fact
    other_receipts = {caller.peer_id: batch(caller, [receipt(a, caller, step=1, mb="a")])}
    assert any(
        "differs" in p
        for p in verify_attestation(att, run_id=RUN, window=0, prev=None, receipts=other_receipts, verdicts={})
    )


def test_replayed_attestation_and_broken_chain_fail(identities):
    a, caller, orch, orch2 = identities[:4]
    r0 = {caller.peer_id: batch(caller, [receipt(a, caller, step=1)], 0)}
    r1 = {caller.peer_id: batch(caller, [receipt(a, caller, step=11)], 1)}
    att0 = attest(orch, 0, r0, {}, None)
    att1 = attest(orch, 1, r1, {}, att0)
    assert verify_attestation(att1, run_id=RUN, window=1, prev=att0, receipts=r1, verdicts={}) == []
    replayed = verify_attestation(att0, run_id=RUN, window=1, prev=att0, receipts=r1, verdicts={})
    assert any("replayed" in p for p in replayed) and any("prev_digest" in p for p in replayed)
    takeover = attest(orch2, 1, r1, {}, att0, term=2)
    assert verify_attestation(takeover, run_id=RUN, window=1, prev=att0, receipts=r1, verdicts={}) == []
    same_term = attest(orch2, 1, r1, {}, att0, term=1)
    assert any(
        "term" in p for p in verify_attestation(same_term, run_id=RUN, window=1, prev=att0, receipts=r1, verdicts={})
    )


async def test_store_pick_and_conflict(identities, caplog):
    a, caller, o1, o2 = identities[:4]
    store = MemoryStore()
    r0 = {caller.peer_id: batch(caller, [receipt(a, caller, step=1)])}
    atts = [attest(o1, 0, r0, {}, None), attest(o2, 0, r0, {}, None)]
    for att in atts:
        await publish_attestation(store, att, 1e9)
    await store.store(attestation_key(RUN, 0), atts[0].pack(), 1e9, subkey=owner_subkey(a.peer_id))  # wrong owner
    await store.store(attestation_key(RUN, 0), b"junk", 1e9, subkey=owner_subkey(caller.peer_id))
    found = await fetch_attestations(store, RUN, 0)
    assert sorted(x.digest for x in found) == sorted(x.digest for x in atts)
    chosen = pick_attestation(found, RUN, 0)
    assert chosen == pick_attestation(list(reversed(found)), RUN, 0)
    assert "conflicting attestations" in caplog.text


def test_ledger_round_trip_and_truncated_tail(tmp_path, identities):
    a, caller, orch = identities[:3]
    r0 = {caller.peer_id: batch(caller, [receipt(a, caller, step=1)])}
    att0 = attest(orch, 0, r0, {}, None)
    att1 = attest(orch, 1, {}, {}, att0)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(att0)
    ledger.append(att1)
    assert ledger.read() == [att0, att1]
    line = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert line["shares"] == {a.peer_id.to_base58(): 1.0} and line["window"] == 0
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"wire": "trunc')
    assert ledger.read() == [att0, att1]
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('\n{"window": 3}\n')
    with pytest.raises(VerificationError, match="corrupt"):
        ledger.read()


def test_reward_config_names_the_bad_field():
    for kwargs, field in (
        ({"window_steps": 0}, "window_steps"),
        ({"stage_costs": (1.0, -1.0)}, "stage_costs"),
        ({"trusted_validators": ("nope",)}, "trusted_validators"),
    ):
        with pytest.raises(ConfigError, match=field):
            RewardConfig(**kwargs)
