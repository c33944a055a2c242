"""Gradient checks: which peers' all-reduce parts are outliers, and signed reports of them.

The stated rule, applied by every owner of a part after the reduction (CenteredClip or mean):

* **outlier**: with at least ``min_senders`` senders, a sender whose part lies farther than
  ``distance_ratio`` x the median sender distance from the reduced center (and farther than ``min_distance``);
* **replayed part**: a sender whose part is bit-for-bit the part it sent for the same span at an earlier
  step (honest gradients never repeat exactly).

Training nodes file a third kind of finding through the same reports: **step_claim**, a peer whose claimed step
the run's records do not back (the claim rule of `swarm.training.claims`).

Owners publish signed `OutlierReport`s under ``{run}/outliers/{window}``. A peer reported by at least
``min_reporters`` distinct other peers in a window is flagged in that window's attestation, and validators
may recompute its gradients from its retained work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.p2p.identity import SIGNATURE_SIZE_BYTES, Identity, PeerID
from swarm.p2p.messages import Message
from swarm.configs import Config, setting
from swarm.errors import RecordError
from swarm.dht.keys import OUTLIERS, outliers_key, owner_subkey
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.verification.common import MAX_RECORD_TTL_S, RecordStore, peer_from_bytes, record_items, signing_body

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_REPORT_DOMAIN = b"swarm/outlier-report/v1\x00"
REASONS = ("outlier", "replayed", "step_claim")  # step_claim: a step claim the records do not back (training)


class OutlierConfig(Config, section="outliers"):
    """The outlier rule's parameters (from the run config)."""

    distance_ratio: float = setting(
        default=10.0, gt=1.0, le=1e6, doc="Outlier: farther than this x the median sender distance from the center."
    )
    min_senders: int = setting(default=3, ge=3, le=10_000, doc="Fewest senders of a part for the rule to apply.")
    min_distance: float = setting(default=1e-8, ge=0, lt=1e6, doc="Distances below this never make an outlier.")
    replay_memory_steps: int = setting(default=16, ge=1, le=10_000, doc="Steps of digests kept to spot replays.")


@dataclass(frozen=True, kw_only=True)
class OutlierEntry(Message):
    peer: bytes
    step: int
    reason: str
    distance: float
    median_distance: float

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {self.reason!r}")
        peer_from_bytes(self.peer, "peer")

    def describe(self) -> str:
        """What the reported peer did, in words."""
        if self.reason == "step_claim":
            return f"claimed step {self.step}, which the run's records do not back"
        return f"{self.reason} gradient part at step {self.step}"


def find_outliers(
    parts: Mapping[PeerID, torch.Tensor], center: torch.Tensor, step: int, cfg: OutlierConfig
) -> list[OutlierEntry]:
    """The senders whose part is an outlier around ``center`` by the stated rule (sorted by PeerID)."""
    import torch  # here, not at import time: the run config imports this module and must stay light

    if len(parts) < cfg.min_senders:
        return []
    c = center.detach().reshape(-1).to(torch.float64)
    distances = {p: float((v.detach().reshape(-1).to(torch.float64) - c).norm()) for p, v in sorted(parts.items())}
    median = float(torch.tensor(list(distances.values()), dtype=torch.float64).median())
    threshold = max(cfg.distance_ratio * median, cfg.min_distance)
    return [
        OutlierEntry(peer=p.to_bytes(), step=step, reason="outlier", distance=d, median_distance=median)
        for p, d in distances.items()
        if d > threshold or d != d
    ]


class ReplayDetector:
    """Remembers the digest of each sender's part per span for a few steps; an exact repeat is a replay."""

    def __init__(self, cfg: OutlierConfig) -> None:
        self.cfg = cfg
        self._seen: OrderedDict[tuple[PeerID, str, bytes], int] = OrderedDict()

    def observe(self, peer: PeerID, span: str, step: int, part: torch.Tensor) -> OutlierEntry | None:
        """Record ``part``; an entry if ``peer`` sent exactly these values for ``span`` at an earlier step. An
        all-zero part proves nothing (an honest peer whose downstream stage returned zero gradients sends one
        every step) and is ignored."""
        data = part.detach().contiguous().cpu().reshape(-1)
        if not bool(data.any()):
            return None
        digest = hashlib.sha256(str(data.dtype).encode() + data.numpy().tobytes()).digest()
        key = (peer, span, digest)
        while self._seen and next(iter(self._seen.values())) < step - self.cfg.replay_memory_steps:
            self._seen.popitem(last=False)
        first_step = self._seen.get(key)
        if first_step is not None and first_step < step:
            return OutlierEntry(
                peer=peer.to_bytes(), step=step, reason="replayed", distance=0.0, median_distance=float(first_step)
            )
        if first_step is None:
            self._seen[key] = step
        return None


@dataclass(frozen=True, kw_only=True)
class OutlierReport(Message):
    """One reporter's findings in one window, signed."""

    run_id: str
    window: int
    reporter: bytes
    entries: list[OutlierEntry]
    signature: bytes

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if len(self.signature) != SIGNATURE_SIZE_BYTES:
            raise ValueError(f"signature must have {SIGNATURE_SIZE_BYTES} bytes")
        peer_from_bytes(self.reporter, "reporter")

    def body(self) -> bytes:
        fields = self.to_wire()
        del fields["signature"]
        return signing_body(_REPORT_DOMAIN, fields)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.pack()).digest()

    @property
    def reporter_id(self) -> PeerID:
        return PeerID(self.reporter)

    def is_valid(self) -> bool:
        return self.reporter_id.verify(self.signature, self.body())


OUTLIERS_SCHEMA = RecordSchema(
    key=OUTLIERS, kind=RecordKind.OWNED, value_types=(OutlierReport,), packed=True, max_ttl_s=MAX_RECORD_TTL_S
)


def sign_report(identity: Identity, *, run_id: str, window: int, entries: Sequence[OutlierEntry]) -> OutlierReport:
    unsigned = OutlierReport(
        run_id=run_id,
        window=window,
        reporter=identity.peer_id.to_bytes(),
        entries=list(entries),
        signature=bytes(SIGNATURE_SIZE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.body()))


async def publish_report(store: RecordStore, report: OutlierReport, expiration_time: float) -> bool:
    return await store.store(
        outliers_key(report.run_id, report.window),
        report.pack(),
        expiration_time,
        subkey=owner_subkey(report.reporter_id),
    )


async def fetch_reports(store: RecordStore, run_id: str, window: int) -> dict[PeerID, OutlierReport]:
    """Signed, well-formed reports of a window stored under their reporters' own subkeys."""
    out: dict[PeerID, OutlierReport] = {}
    for subkey, raw in record_items(await store.get(outliers_key(run_id, window), latest=True)):
        try:
            report = OUTLIERS_SCHEMA.parse_value(raw)
            if not isinstance(report, OutlierReport):
                raise RecordError(f"expected an OutlierReport, got a {type(report).__name__}")
        except RecordError as e:
            log.warning("dropping a malformed outlier report for %s window %d: %s", run_id, window, e)
            continue
        if subkey == owner_subkey(report.reporter_id) and report.run_id == run_id and report.window == window:
            out[report.reporter_id] = report
    return out


def reported_peers(reports: Mapping[PeerID, OutlierReport], min_reporters: int) -> dict[PeerID, str]:
    """Peers named by at least ``min_reporters`` distinct other reporters with valid signatures -> a reason."""
    by_peer: dict[PeerID, set[PeerID]] = {}
    reasons: dict[PeerID, str] = {}
    for reporter, report in sorted(reports.items()):
        if not report.is_valid():
            continue
        for entry in report.entries:
            peer = PeerID(entry.peer)
            if peer != reporter:
                by_peer.setdefault(peer, set()).add(reporter)
                reasons.setdefault(peer, entry.describe())
    return {
        p: f"{reasons[p]} (reported by {len(r)} peers)" for p, r in sorted(by_peer.items()) if len(r) >= min_reporters
    }
