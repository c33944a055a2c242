"""The step-claim rule: which step of the run a node believes, and whose claims it does not (docs/training.md).

A node never moves its step on one peer's word. It believes a step only on evidence from the run's signed records
(`PeerRecord` under ``{run}/peers``, `ProgressRecord` under ``{run}/progress``; each owner-signed, so one record per
PeerID), counting OTHER peers only (never this node's own records, which may be a previous life's) and leaving out
peers already caught cheating:

1. **Peers.** A peer's claim is the higher of its peer record's step (when it serves a stage: trainers and
   validators only echo the stages' steps) and its progress record's step. Step N is backed by the peers when at
   least q distinct peers claim N or more, with q = 2, or 1 when only one other peer has a record (a majority of
   one). So the peers back the q-th highest claim, and no single peer moves a node while others are there.
2. **Samples.** The drivers' progress records must back it too: a stage only closes step N-1 once drivers fed
   it ``target_batch_size`` samples. The samples back step N+1 when the progress records at step N add up to the
   target, and the step that min(2, drivers) distinct drivers feed (the q-th highest progress step); when this
   node drives itself, also its own step + 1. Without any driver's progress record, the samples set no bound.

The believed step is the lower of the two. A peer whose claim exceeds it by more than `CLAIM_SLACK_STEPS` is not
believed: it is no source of state, and a checkpoint that far ahead is not believed either. A claim more than
`REPORT_LEAD_STEPS` ahead of both the believed step and this node's own step is reported like a cheat
(`swarm.training.verifying.NodeVerification.report_step_claim`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from swarm.p2p.identity import PeerID
from swarm.training.messages import PeerRecord
from swarm.training.progress import ProgressRecord

CLAIM_SLACK_STEPS = 1  # a peer this many steps ahead of the believed step is still believed (it closed first)
REPORT_LEAD_STEPS = 8  # a claim this far ahead of the believed step and of this node's own is reported


def quorum(claimants: int) -> int:
    """Distinct peers a step needs: 2, or 1 when only one other peer has a record (0 without any)."""
    return min(2, claimants)


def _kth_highest(values: Collection[int], k: int) -> int | None:
    if k <= 0 or len(values) < k:
        return None
    return sorted(values, reverse=True)[k - 1]


def peer_claims(
    peers: Mapping[PeerID, PeerRecord],
    progress: Mapping[PeerID, ProgressRecord],
    *,
    me: PeerID,
    exclude: Collection[PeerID],
) -> dict[PeerID, int]:
    """Each other peer's claimed step: the higher of its stage record's and its progress record's."""
    claims: dict[PeerID, int] = {}
    for peer, record in peers.items():
        if peer != me and peer not in exclude and record.stage is not None:
            claims[peer] = record.step
    for peer, progress_record in progress.items():
        if peer != me and peer not in exclude:
            claims[peer] = max(claims.get(peer, 0), progress_record.step)
    return claims


def samples_step(
    progress: Mapping[PeerID, ProgressRecord],
    *,
    me: PeerID,
    exclude: Collection[PeerID],
    target_batch_size: int,
    own_step: int | None = None,
) -> int | None:
    """The highest step the drivers' samples back (None: no driver's progress record, no bound). ``own_step``:
    the step this node drives now, if it drives."""
    records = [r for p, r in progress.items() if p != me and p not in exclude]
    backed: list[int] = [] if own_step is None else [own_step + 1]
    if records:
        fed = _kth_highest([r.step for r in records], quorum(len(records)))
        if fed is not None:
            backed.append(fed)
        totals: dict[int, int] = {}
        for r in records:
            totals[r.step] = totals.get(r.step, 0) + r.samples
        backed += [step + 1 for step, samples in totals.items() if samples >= target_batch_size]
    return max(backed) if backed else None


@dataclass(frozen=True, kw_only=True)
class StepEvidence:
    """What the records back: ``believed`` (None: no other peer has a record, so nothing to believe or doubt)
    and each other peer's claim."""

    believed: int | None
    claims: Mapping[PeerID, int] = field(default_factory=dict)

    def backs(self, step: int) -> bool:
        """Whether ``step`` may be taken from a peer or a checkpoint (at most `CLAIM_SLACK_STEPS` ahead)."""
        return self.believed is None or step <= self.believed + CLAIM_SLACK_STEPS

    def unbacked(self) -> frozenset[PeerID]:
        """Peers whose claim the rule does not believe (never a source of state)."""
        return frozenset(p for p, step in self.claims.items() if not self.backs(step))

    def to_report(self, own_step: int) -> dict[PeerID, int]:
        """Peers whose claim is more than `REPORT_LEAD_STEPS` ahead of the believed step and of ``own_step``."""
        if self.believed is None:
            return {}
        bound = max(self.believed, own_step) + REPORT_LEAD_STEPS
        return {p: step for p, step in sorted(self.claims.items()) if step > bound}


def step_evidence(
    peers: Mapping[PeerID, PeerRecord],
    progress: Mapping[PeerID, ProgressRecord],
    *,
    me: PeerID,
    exclude: Collection[PeerID] = (),
    target_batch_size: int,
    own_step: int | None = None,
) -> StepEvidence:
    """Apply the rule (module docstring) to the run's records; ``own_step``: the step this node drives, if any."""
    claims = peer_claims(peers, progress, me=me, exclude=exclude)
    by_peers = _kth_highest(list(claims.values()), quorum(len(claims)))
    if by_peers is None:
        return StepEvidence(believed=None, claims=claims)
    by_samples = samples_step(progress, me=me, exclude=exclude, target_batch_size=target_batch_size, own_step=own_step)
    believed = by_peers if by_samples is None else min(by_peers, by_samples)
    return StepEvidence(believed=believed, claims=claims)
