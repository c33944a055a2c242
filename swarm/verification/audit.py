"""Auditing a run's attestations from DHT data: what `swarm-dht attestations --verify` runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from swarm.p2p.identity import PeerID
from swarm.verification.attestation import Attestation, fetch_attestations, pick_attestation, verify_attestation
from swarm.verification.common import RecordStore
from swarm.verification.outliers import fetch_reports
from swarm.verification.receipts import fetch_receipts
from swarm.verification.verdicts import fetch_verdicts

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class WindowAudit:
    """The accepted attestation of one window and, when verified, every problem found with it."""

    window: int
    attestation: Attestation | None
    num_attestations: int
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.attestation is not None and not self.problems

    def to_json(self) -> dict[str, Any]:
        att = self.attestation
        return {
            "window": self.window,
            "orchestrator": att.orchestrator_id.to_base58() if att else None,
            "term": att.term if att else None,
            "shares": {PeerID(e.peer).to_base58(): e.share for e in att.shares} if att else {},
            "flagged": [PeerID(p).to_base58() for p in att.flagged] if att else [],
            "num_attestations": self.num_attestations,
            "verified": self.verified,
            "ok": self.ok,
            "problems": self.problems,
        }


async def audit_window(
    store: RecordStore, run_id: str, window: int, prev: Attestation | None, *, verify: bool
) -> WindowAudit:
    """Fetch and (with ``verify``) check one window's accepted attestation against the DHT evidence.

    When records are stored for the window but none is acceptable (unsigned, tampered, or replayed from
    another window), the audit fails with the reasons found for them."""
    found = await fetch_attestations(store, run_id, window)
    att = pick_attestation(found, run_id, window)
    audit = WindowAudit(
        window=window, attestation=att, num_attestations=len({a.digest for a in found}), verified=verify
    )
    if att is None:
        audit.problems.append("no validly signed attestation for this run and window is stored")
        if verify:
            for other in found:
                audit.problems += verify_attestation(
                    other, run_id=run_id, window=window, prev=prev, receipts={}, verdicts={}
                )
        return audit
    if verify:
        audit.problems = verify_attestation(
            att,
            run_id=run_id,
            window=window,
            prev=prev,
            receipts=await fetch_receipts(store, run_id, window),
            verdicts=await fetch_verdicts(store, run_id, window),
            reports=await fetch_reports(store, run_id, window),
        )
    return audit


async def audit_run(
    store: RecordStore, run_id: str, *, window: int | None = None, verify: bool = True, max_windows: int = 100_000
) -> list[WindowAudit]:
    """Audit one window (with its predecessor as the chain anchor) or every window from 0 to the first gap."""
    if window is not None:
        prev = None
        if window > 0:
            prev = pick_attestation(await fetch_attestations(store, run_id, window - 1), run_id, window - 1)
        if window > 0 and prev is None and verify:
            audit = await audit_window(store, run_id, window, None, verify=False)
            audit.verified = True
            audit.problems.append(f"window {window - 1} has no attestation, so this one cannot be chained")
            return [audit]
        return [await audit_window(store, run_id, window, prev, verify=verify)]
    audits: list[WindowAudit] = []
    prev = None
    for w in range(max_windows):
        audit = await audit_window(store, run_id, w, prev, verify=verify)
        if audit.num_attestations == 0:
            break
        audits.append(audit)
        prev = audit.attestation
    return audits
