"""Reward shares from receipts and verdicts: the pure function both the orchestrator and verifiers run.

Work of a peer = sum over the valid receipts others signed for it in the window of
``num_samples x stage_cost[stage] x (backward_cost for a backward, 1 for a forward)``. A peer with a failed
check (a failed verdict from an accepted validator, an invalid receipt in the batch it published, or outlier
reports from ``outlier_min_reporters`` distinct peers) is
flagged; flags carry over to every later window; flagged peers get share 0. Shares of the others are
proportional to work and sum to 1 (or there are none, when no work was verified).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from swarm.p2p.identity import PeerID
from swarm.configs import Config, setting
from swarm.verification.outliers import OutlierReport, reported_peers
from swarm.verification.receipts import ReceiptBatch, WorkReceipt
from swarm.verification.verdicts import VerdictBatch


class RewardConfig(Config, section="rewards"):
    """How work is weighed and which verdicts count (from the run config)."""

    window_steps: int = setting(default=10, ge=1, le=1_000_000, doc="Steps per reward window.")
    stage_costs: tuple[float, ...] = setting(
        default=(), gt=0, le=1e6, doc="Relative compute cost of each stage (missing: 1.0)."
    )
    backward_cost: float = setting(default=2.0, gt=0, le=100, doc="Cost of a backward relative to a forward.")
    trusted_validators: tuple[str, ...] = setting(default=(), doc="PeerIDs whose verdicts count.")
    outlier_min_reporters: int = setting(
        default=2, ge=0, le=10_000, doc="Reports that make a peer an offender (0: ignore reports)."
    )

    def validate(self) -> None:
        for text in self.trusted_validators:
            try:
                PeerID.from_base58(text)
            except Exception:
                raise self.invalid("trusted_validators", f"{text!r} is not a PeerID") from None

    def window_of(self, step: int) -> int:
        return step // self.window_steps

    def stage_cost(self, stage: int) -> float:
        return float(self.stage_costs[stage]) if stage < len(self.stage_costs) else 1.0


@dataclass(kw_only=True)
class RewardOutcome:
    """What a window's evidence implies: work, shares, flags and the ids of the evidence used."""

    work: dict[PeerID, float] = field(default_factory=dict)
    shares: dict[PeerID, float] = field(default_factory=dict)
    flagged: set[PeerID] = field(default_factory=set)
    flag_reasons: dict[PeerID, str] = field(default_factory=dict)
    receipt_ids: list[bytes] = field(default_factory=list)
    verdict_ids: list[bytes] = field(default_factory=list)
    report_ids: list[bytes] = field(default_factory=list)

    @property
    def evidence_hash(self) -> bytes:
        """SHA-256 of the sorted receipt ids, verdict ids and outlier-report digests that were used."""
        h = hashlib.sha256(b"swarm/evidence/v1\x00")
        for group in (self.receipt_ids, self.verdict_ids, self.report_ids):
            h.update(len(group).to_bytes(8, "big"))
            for item in sorted(group):
                h.update(item)
        return h.digest()


def compute_rewards(
    run_id: str,
    window: int,
    receipts: Mapping[PeerID, ReceiptBatch],
    verdicts: Mapping[PeerID, VerdictBatch],
    previously_flagged: Iterable[PeerID],
    cfg: RewardConfig,
    reports: Mapping[PeerID, OutlierReport] | None = None,
) -> RewardOutcome:
    """The deterministic reward outcome of one window (same inputs, same result, on every machine)."""
    out = RewardOutcome(flagged=set(previously_flagged))
    counted = _valid_receipts(run_id, window, receipts, cfg, out)
    _apply_verdicts(run_id, window, verdicts, counted, cfg, out)
    if reports and cfg.outlier_min_reporters > 0:
        out.report_ids = sorted(r.digest for r in reports.values())
        for peer, reason in reported_peers(reports, cfg.outlier_min_reporters).items():
            _flag(out, peer, reason)
    for receipt in counted.values():
        claim = receipt.claim
        weight = cfg.stage_cost(claim.stage) * (cfg.backward_cost if claim.kind == "backward" else 1.0)
        server = claim.server_id
        out.work[server] = out.work.get(server, 0.0) + claim.num_samples * weight
    paid = {p: w for p, w in sorted(out.work.items()) if p not in out.flagged and w > 0}
    total = sum(paid.values())
    out.shares = {p: (w / total if p in paid else 0.0) for p, w in sorted(out.work.items())} if total > 0 else {}
    return out


def _flag(out: RewardOutcome, peer: PeerID, reason: str) -> None:
    out.flagged.add(peer)
    out.flag_reasons.setdefault(peer, reason)


def _valid_receipts(
    run_id: str, window: int, batches: Mapping[PeerID, ReceiptBatch], cfg: RewardConfig, out: RewardOutcome
) -> dict[bytes, WorkReceipt]:
    counted: dict[bytes, WorkReceipt] = {}
    seen_work: set[tuple[bytes, int, int, str, str]] = set()
    for publisher in sorted(batches):
        for receipt in batches[publisher].receipts:
            problem = receipt.problem()
            if problem is not None:
                _flag(out, publisher, f"published an invalid receipt: {problem}")
                continue
            claim = receipt.claim
            if claim.run_id != run_id or cfg.window_of(claim.step) != window:
                continue
            rid = receipt.receipt_id
            work_key = (claim.server, claim.step, claim.stage, claim.microbatch_id, claim.kind)
            if rid in counted or work_key in seen_work:
                continue
            counted[rid] = receipt
            seen_work.add(work_key)
    out.receipt_ids = sorted(counted)
    return counted


def _apply_verdicts(
    run_id: str,
    window: int,
    batches: Mapping[PeerID, VerdictBatch],
    counted: Mapping[bytes, WorkReceipt],
    cfg: RewardConfig,
    out: RewardOutcome,
) -> None:
    trusted = {PeerID.from_base58(t) for t in cfg.trusted_validators}
    used: set[bytes] = set()
    for validator in sorted(batches):
        if trusted and validator not in trusted:
            continue
        for verdict in batches[validator].verdicts:
            receipt = counted.get(verdict.receipt_id)
            if receipt is None or verdict.subject != receipt.claim.server or verdict.validator == verdict.subject:
                continue
            if verdict.run_id != run_id or verdict.window != window or not verdict.is_valid():
                continue
            used.add(verdict.verdict_id)
            if not verdict.passed:
                _flag(out, verdict.subject_id, f"failed check by {validator.short()}: {verdict.reason}")
    out.verdict_ids = sorted(used)
