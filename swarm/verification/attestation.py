"""Signed reward attestations: one per step window, stored in the DHT and checked by anyone.

An attestation names the run, the window, the orchestrator's term and PeerID, each peer's verified work and
share, the flagged peers, the receipt and verdict batches it used (publisher + digest) and a hash of the
receipt and verdict ids. ``prev_digest`` chains it to the accepted attestation of the previous window, so an
old attestation replayed under a new window, or a re-ordered ledger, fails verification.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swarm.p2p.identity import SIGNATURE_SIZE_BYTES, Identity, PeerID
from swarm.p2p.messages import Message
from swarm.dht.keys import ATTESTATION, attestation_key, owner_subkey
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.errors import RecordError
from swarm.verification.common import (
    DIGEST_SIZE_BYTES,
    MAX_RECORD_TTL_S,
    RecordStore,
    check_digest,
    peer_from_bytes,
    record_items,
    signing_body,
)
from swarm.verification.outliers import OutlierReport
from swarm.verification.receipts import ReceiptBatch
from swarm.verification.rewards import RewardConfig, RewardOutcome, compute_rewards
from swarm.verification.verdicts import VerdictBatch

log = logging.getLogger(__name__)

_ATTESTATION_DOMAIN = b"swarm/attestation/v1\x00"
_RANK_DOMAIN = b"swarm/leader-rank/v1\x00"
GENESIS_DIGEST = bytes(DIGEST_SIZE_BYTES)
SHARE_SUM_TOLERANCE = 1e-9
EVIDENCE_KINDS = ("receipts", "verdicts", "outliers")


@dataclass(frozen=True, kw_only=True)
class ShareEntry(Message):
    peer: bytes
    work: float
    share: float


@dataclass(frozen=True, kw_only=True)
class EvidenceRef(Message):
    """A receipt or verdict batch an attestation used: who published it and the SHA-256 of its bytes."""

    kind: str
    publisher: bytes
    digest: bytes

    def __post_init__(self) -> None:
        if self.kind not in EVIDENCE_KINDS:
            raise ValueError(f"kind must be one of {EVIDENCE_KINDS}, got {self.kind!r}")
        check_digest(self.digest, "digest")
        peer_from_bytes(self.publisher, "publisher")


@dataclass(frozen=True, kw_only=True)
class Attestation(Message):
    run_id: str
    window: int
    term: int
    orchestrator: bytes
    window_steps: int
    stage_costs: list[float]
    backward_cost: float
    trusted_validators: list[str]
    outlier_min_reporters: int
    shares: list[ShareEntry]
    flagged: list[bytes]
    evidence: list[EvidenceRef]
    evidence_hash: bytes
    prev_digest: bytes
    issued_at: float
    signature: bytes

    def __post_init__(self) -> None:
        if self.window < 0 or self.term < 1 or self.window_steps < 1:
            raise ValueError("window must be >= 0, term >= 1, window_steps >= 1")
        check_digest(self.evidence_hash, "evidence_hash")
        check_digest(self.prev_digest, "prev_digest")
        if len(self.signature) != SIGNATURE_SIZE_BYTES:
            raise ValueError(f"signature must have {SIGNATURE_SIZE_BYTES} bytes")
        peer_from_bytes(self.orchestrator, "orchestrator")

    def body(self) -> bytes:
        fields = self.to_wire()
        del fields["signature"]
        return signing_body(_ATTESTATION_DOMAIN, fields)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the signed body: what the next window's ``prev_digest`` names."""
        return hashlib.sha256(self.body()).digest()

    @property
    def orchestrator_id(self) -> PeerID:
        return PeerID(self.orchestrator)

    def is_signed(self) -> bool:
        return self.orchestrator_id.verify(self.signature, self.body())

    def reward_config(self) -> RewardConfig:
        return RewardConfig(
            window_steps=self.window_steps,
            stage_costs=tuple(self.stage_costs),
            backward_cost=self.backward_cost,
            trusted_validators=tuple(self.trusted_validators),
            outlier_min_reporters=self.outlier_min_reporters,
        )

    def share_map(self) -> dict[PeerID, float]:
        return {PeerID(e.peer): e.share for e in self.shares}


ATTESTATION_SCHEMA = RecordSchema(
    key=ATTESTATION, kind=RecordKind.OWNED, value_types=(Attestation,), packed=True, max_ttl_s=MAX_RECORD_TTL_S
)


def leader_rank(run_id: str, peer: PeerID) -> bytes:
    """The election key: the live candidate with the smallest rank leads (same on every machine)."""
    return hashlib.sha256(_RANK_DOMAIN + run_id.encode() + peer.to_bytes()).digest()


def build_attestation(
    identity: Identity,
    *,
    run_id: str,
    window: int,
    term: int,
    cfg: RewardConfig,
    outcome: RewardOutcome,
    receipts: Mapping[PeerID, ReceiptBatch],
    verdicts: Mapping[PeerID, VerdictBatch],
    prev_digest: bytes,
    issued_at: float,
    reports: Mapping[PeerID, OutlierReport] | None = None,
) -> Attestation:
    """Sign the attestation of ``outcome`` for ``window`` as the orchestrator ``identity``."""
    evidence = [
        EvidenceRef(kind="receipts", publisher=p.to_bytes(), digest=b.digest) for p, b in sorted(receipts.items())
    ]
    evidence += [
        EvidenceRef(kind="verdicts", publisher=p.to_bytes(), digest=b.digest) for p, b in sorted(verdicts.items())
    ]
    if cfg.outlier_min_reporters > 0:
        evidence += [
            EvidenceRef(kind="outliers", publisher=p.to_bytes(), digest=r.digest)
            for p, r in sorted((reports or {}).items())
        ]
    unsigned = Attestation(
        run_id=run_id,
        window=window,
        term=term,
        orchestrator=identity.peer_id.to_bytes(),
        window_steps=cfg.window_steps,
        stage_costs=[float(c) for c in cfg.stage_costs],
        backward_cost=float(cfg.backward_cost),
        trusted_validators=list(cfg.trusted_validators),
        outlier_min_reporters=cfg.outlier_min_reporters,
        shares=[
            ShareEntry(peer=p.to_bytes(), work=outcome.work[p], share=outcome.shares.get(p, 0.0))
            for p in sorted(outcome.work)
        ],
        flagged=[p.to_bytes() for p in sorted(outcome.flagged)],
        evidence=evidence,
        evidence_hash=outcome.evidence_hash,
        prev_digest=prev_digest,
        issued_at=float(issued_at),
        signature=bytes(SIGNATURE_SIZE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.body()))


async def publish_attestation(store: RecordStore, att: Attestation, expiration_time: float) -> bool:
    """Store the attestation under ``{run}/attestation/{window}``, subkey owned by the orchestrator."""
    return await store.store(
        attestation_key(att.run_id, att.window), att.pack(), expiration_time, subkey=owner_subkey(att.orchestrator_id)
    )


async def fetch_attestations(store: RecordStore, run_id: str, window: int) -> list[Attestation]:
    """Every well-formed attestation stored for a window (possibly several, from competing leaders)."""
    found = []
    for subkey, raw in record_items(await store.get(attestation_key(run_id, window), latest=True)):
        try:
            att = ATTESTATION_SCHEMA.parse_value(raw)
            if not isinstance(att, Attestation):
                raise RecordError(f"expected an Attestation, got a {type(att).__name__}")
        except RecordError as e:
            log.warning("dropping a malformed attestation for %s window %d: %s", run_id, window, e)
            continue
        if subkey != owner_subkey(att.orchestrator_id):
            log.warning("dropping attestation of %s stored under subkey %r", att.orchestrator_id.short(), subkey)
            continue
        found.append(att)
    return found


def pick_attestation(candidates: Sequence[Attestation], run_id: str, window: int) -> Attestation | None:
    """The one attestation honest nodes accept for a window: among the signed ones for this run and window,
    the one whose orchestrator ranks first (then the smallest digest). A conflict is logged."""
    valid = [a for a in candidates if a.run_id == run_id and a.window == window and a.is_signed()]
    if not valid:
        return None
    valid.sort(key=lambda a: (leader_rank(run_id, a.orchestrator_id), a.digest))
    if len({a.digest for a in valid}) > 1:
        log.warning(
            "conflicting attestations for %s window %d from %s; accepting the one of %s",
            run_id,
            window,
            ", ".join(a.orchestrator_id.short() for a in valid),
            valid[0].orchestrator_id.short(),
        )
    return valid[0]


def verify_attestation(
    att: Attestation,
    *,
    run_id: str,
    window: int,
    prev: Attestation | None,
    receipts: Mapping[PeerID, ReceiptBatch],
    verdicts: Mapping[PeerID, VerdictBatch],
    reports: Mapping[PeerID, OutlierReport] | None = None,
) -> list[str]:
    """Every reason ``att`` is not the correct attestation of ``window`` given the evidence; [] if it is.

    ``prev`` is the accepted attestation of ``window - 1`` (None for window 0); ``receipts``/``verdicts``/
    ``reports`` are the batches stored in the DHT for the window, by publisher.
    """
    problems = []
    if not att.is_signed():
        return ["the orchestrator's signature does not verify (tampered or wrongly signed)"]
    if att.run_id != run_id or att.window != window:
        problems.append(f"attestation is for {att.run_id}/{att.window}, stored as {run_id}/{window} (replayed)")
    expected_prev = prev.digest if prev is not None else GENESIS_DIGEST
    if att.prev_digest != expected_prev:
        problems.append("prev_digest does not name the accepted attestation of the previous window")
    expected_term = 1 if prev is None else prev.term + (0 if prev.orchestrator == att.orchestrator else 1)
    if att.term != expected_term:
        problems.append(f"term {att.term}, expected {expected_term} from the previous window's orchestrator")
    total = sum(e.share for e in att.shares)
    if (
        att.shares
        and any(e.share > 0 for e in att.shares)
        and not math.isclose(total, 1.0, abs_tol=SHARE_SUM_TOLERANCE)
    ):
        problems.append(f"shares sum to {total!r}, not 1")
    pools: dict[str, Mapping[PeerID, Any]] = {"receipts": receipts, "verdicts": verdicts, "outliers": reports or {}}
    problems += _check_evidence(att, pools)
    if problems:
        return problems
    used = {
        kind: {PeerID(e.publisher): pools[kind][PeerID(e.publisher)] for e in att.evidence if e.kind == kind}
        for kind in EVIDENCE_KINDS
    }
    prev_flagged = [PeerID(p) for p in prev.flagged] if prev is not None else []
    outcome = compute_rewards(
        run_id, window, used["receipts"], used["verdicts"], prev_flagged, att.reward_config(), used["outliers"]
    )
    return _compare_outcome(att, outcome)


def _check_evidence(att: Attestation, pools: Mapping[str, Mapping[PeerID, Any]]) -> list[str]:
    problems = []
    for ref in att.evidence:
        batch = pools[ref.kind].get(PeerID(ref.publisher))
        if batch is None:
            problems.append(
                f"{ref.kind} batch of {PeerID(ref.publisher).short()} is not in the DHT (expired or withheld)"
            )
        elif batch.digest != ref.digest:
            problems.append(f"{ref.kind} batch of {PeerID(ref.publisher).short()} differs from the one attested")
    return problems


def _compare_outcome(att: Attestation, outcome: RewardOutcome) -> list[str]:
    problems = []
    if att.evidence_hash != outcome.evidence_hash:
        problems.append("evidence_hash does not match the receipts and verdicts used")
    if sorted(att.flagged) != sorted(p.to_bytes() for p in outcome.flagged):
        problems.append("flagged peers do not follow from the verdicts and receipts")
    claimed = {PeerID(e.peer): (e.work, e.share) for e in att.shares}
    expected = {p: (outcome.work[p], outcome.shares.get(p, 0.0)) for p in outcome.work}
    if set(claimed) != set(expected):
        problems.append("the set of peers with work does not follow from the receipts")
    else:
        for peer, (work, share) in expected.items():
            got_work, got_share = claimed[peer]
            if not math.isclose(got_work, work, rel_tol=1e-12) or not math.isclose(got_share, share, abs_tol=1e-12):
                problems.append(f"{peer.short()}: work/share {got_work}/{got_share}, expected {work}/{share}")
    return problems
