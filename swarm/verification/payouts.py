"""Payouts: each peer's summed reward share over a run's verified attestation windows, as CSV.

What `swarm-dht attestations --run RUN --verify --payouts FILE.csv` writes. Only windows whose accepted
attestation verifies (`swarm.verification.audit.WindowAudit.ok` after `audit_run(..., verify=True)`) count;
every other window of the audited range is left out and named in the header, with its reason. A window whose
attestation is tampered also leaves out the next one: that one's ``prev_digest`` names the original, which is gone,
so its chain link cannot be checked (the window after it is checked against the next one's stored attestation).

One row per peer that has verified work or a flag in a counted window:

- ``peer_id``: the PeerID (base58, ``12D3KooW...``);
- ``share``: the sum over the counted windows of the peer's share (each window's shares sum to 1, or to 0 when
  nobody had verified work, so the column sums to ``windows_with_work``);
- ``windows``: the counted windows in which the peer has verified work (paid or not);
- ``flagged_windows``: the counted windows whose attestation flags the peer (its share there is 0);
- ``public_key_base58``: the peer's Ed25519 public key (the 32 bytes inside its PeerID's identity multihash) in
  base58, which is also its Solana address, so rewards can be settled on a chain that checks Ed25519 signatures.

Comment lines (``# key=value``) before the header state the run id, the window range audited, how many windows
were counted and left out, and why each left-out window was.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import base58

from swarm.p2p.identity import PeerID
from swarm.verification.audit import WindowAudit

CSV_COLUMNS = ("peer_id", "share", "windows", "flagged_windows", "public_key_base58")
SHARE_DECIMALS = 12


def public_key_base58(peer: PeerID) -> str:
    """The peer's raw Ed25519 public key in base58: its Solana address."""
    return base58.b58encode(peer.public_key_bytes).decode("ascii")


@dataclass(kw_only=True)
class PeerPayout:
    """One peer's totals over the counted windows."""

    peer: PeerID
    share: float = 0.0
    windows: int = 0
    flagged_windows: int = 0


@dataclass(kw_only=True)
class PayoutReport:
    """Per-peer totals over a run's verified windows, and which windows were left out and why."""

    run_id: str
    first_window: int
    last_window: int
    counted: list[int] = field(default_factory=list)
    left_out: dict[int, str] = field(default_factory=dict)  # window -> the first reason it does not verify
    windows_with_work: int = 0
    peers: dict[PeerID, PeerPayout] = field(default_factory=dict)

    def rows(self) -> list[PeerPayout]:
        """Largest share first, then by PeerID."""
        return sorted(self.peers.values(), key=lambda p: (-p.share, p.peer))

    def to_csv(self) -> str:
        out = io.StringIO()
        out.write("# swarm payouts: summed reward shares over the windows whose attestation verifies\n")
        out.write(f"# run_id={self.run_id}\n")
        out.write(f"# windows={self.first_window}..{self.last_window}\n")
        out.write(f"# counted={len(self.counted)}\n")
        out.write(f"# windows_with_work={self.windows_with_work}\n")
        out.write(f"# left_out={len(self.left_out)}\n")
        for window, reason in sorted(self.left_out.items()):
            out.write(f"# left_out_window={window}: {_one_line(reason)}\n")
        out.write("# public_key_base58 is the peer's Ed25519 public key, which is also its Solana address\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for p in self.rows():
            writer.writerow(
                (
                    p.peer.to_base58(),
                    f"{p.share:.{SHARE_DECIMALS}f}",
                    p.windows,
                    p.flagged_windows,
                    public_key_base58(p.peer),
                )
            )
        return out.getvalue()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def payouts_from_audits(run_id: str, audits: Sequence[WindowAudit]) -> PayoutReport:
    """Sum the shares of every verified window in ``audits`` (from ``audit_run(..., verify=True)``).

    ValueError if ``audits`` is empty or was not verified: unverified windows must never be paid."""
    if not audits:
        raise ValueError(f"no attestation windows of run {run_id!r} to pay out")
    if not all(a.verified for a in audits):
        raise ValueError("payouts need verified audits (audit_run(..., verify=True))")
    windows = [a.window for a in audits]
    report = PayoutReport(run_id=run_id, first_window=min(windows), last_window=max(windows))
    for audit in sorted(audits, key=lambda a: a.window):
        att = audit.attestation
        if not audit.ok or att is None:
            report.left_out[audit.window] = audit.problems[0] if audit.problems else "no attestation"
            continue
        report.counted.append(audit.window)
        if any(e.share > 0 for e in att.shares):
            report.windows_with_work += 1
        for entry in att.shares:
            payout = report.peers.setdefault(PeerID(entry.peer), PeerPayout(peer=PeerID(entry.peer)))
            payout.share += entry.share
            payout.windows += 1
        for raw in att.flagged:
            payout = report.peers.setdefault(PeerID(raw), PeerPayout(peer=PeerID(raw)))
            payout.flagged_windows += 1
    return report
