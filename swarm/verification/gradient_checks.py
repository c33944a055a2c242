"""A training node's gradient checks: inspect the all-reduce parts it reduced, report outliers and replays.

Each owner of a span in the stage's all-reduce keeps every member's values of the first part(s) it reduces
(`swarm.averaging.AveragerConfig.inspect_parts`). After each round `GradientChecker.inspect` applies the stated
rule of `swarm.verification.outliers` to them: a sender far from the reduced center (``find_outliers``), or one that
sent bit-for-bit the values it sent for the same span at an earlier step (`ReplayDetector`); all-zero parts are
not judged. `GradientChecker.flush` publishes one signed `OutlierReport` per window under the node's own
subkey, restating every offender caught so far (re-signed whenever a finding is added, and once in each later
window the node averages in). The orchestrator zeroes and flags a peer reported by ``outlier_min_reporters``
distinct peers in a window. The trainer also leaves caught peers out of its all-reduce groups and spans
(`GradientChecker.offenders`). Findings made outside the all-reduce (a training node's unbacked step claim, reason
``step_claim``) join the same reports through `GradientChecker.report`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from swarm.p2p.identity import Identity, PeerID
from swarm.configs import Config, setting
from swarm.verification.common import RecordStore
from swarm.verification.outliers import (
    OutlierConfig,
    OutlierEntry,
    ReplayDetector,
    fetch_reports,
    find_outliers,
    publish_report,
    reported_peers,
    sign_report,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class InspectedValues(Protocol):
    """One reduced part (`swarm.averaging.allreduce.InspectedPart`): each member's values and the center.

    Read-only members, so that a frozen dataclass satisfies it."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def values(self) -> Mapping[PeerID, torch.Tensor]: ...

    @property
    def center(self) -> torch.Tensor: ...


class GradientCheckConfig(Config, section="gradient_checks"):
    """The run's window length, the outlier rule, and how long reports live in the DHT."""

    run_id: str = setting(doc="The run whose gradients are checked.")
    window_steps: int = setting(ge=1, doc="Steps per reward window.")
    outliers: OutlierConfig = setting(doc="The outlier rule.")
    report_ttl_s: float = setting(default=3600.0, gt=0, le=86400 * 30, doc="Lifetime of an outlier report.")
    min_reporters: int = setting(
        default=2, ge=1, le=10_000, doc="A peer reported by this many others in a window is an offender for everyone."
    )
    replay_block_numel: int = setting(
        default=4096, ge=16, le=1 << 24, doc="Replay digests are taken per block of this many values."
    )
    max_windows_kept: int = setting(default=64, ge=1, le=10_000, doc="Windows of reports kept in memory.")
    max_known_offenders: int = setting(default=1024, ge=1, le=10_000, doc="Offenders remembered.")

    def validate(self) -> None:
        if not self.run_id:
            raise self.invalid("run_id", f"must be a non-empty string, got {self.run_id!r}")


class GradientChecker:
    """Finds outlier and replayed gradient parts among the senders of this node's spans; publishes reports."""

    def __init__(self, identity: Identity, cfg: GradientCheckConfig, store: RecordStore) -> None:
        self.identity = identity
        self.cfg = cfg
        self.store = store
        self.replays = ReplayDetector(cfg.outliers)
        self._windows: set[int] = set()  # windows this node inspected parts in
        self._known: dict[tuple[bytes, str], OutlierEntry] = {}  # every finding, with its first evidence
        self._dirty: set[int] = set()
        self._reported: dict[PeerID, str] = {}  # peers reported by a quorum of others (read from the DHT)
        # `inspect` runs in a worker thread, the rest on the event loop: the state above changes under this lock,
        # and the offender sets are rebuilt then, so the per-RPC `offenders()` is a plain read
        self._lock = threading.Lock()
        self._offenders: frozenset[PeerID] = frozenset()
        self._confirmed: frozenset[PeerID] = frozenset()

    def _rebuild_sets(self) -> None:
        """Recompute the offender sets (the lock is held)."""
        self._confirmed = frozenset(self._reported)
        self._offenders = frozenset(PeerID(peer) for peer, _ in self._known) | self._confirmed

    def inspect(self, step: int, stage: int, parts: Sequence[InspectedValues]) -> list[OutlierEntry]:
        """Apply the rule to one round's inspected parts; returns the new findings about other peers (CPU work:
        call it in a worker thread)."""
        me = self.identity.peer_id
        found: list[OutlierEntry] = []
        for part in parts:
            # an all-zero part is no evidence either way (e.g. an honest peer whose downstream stage returned zero
            # gradients): it is not judged, and not counted among the senders the median is taken over
            judged = {p: v for p, v in part.values.items() if bool(v.any())}
            found += find_outliers(judged, part.center, step, self.cfg.outliers)
            for peer, values in sorted(part.values.items()):
                if peer != me:
                    found += self._replays_in(peer, stage, step, part.start, values)
        with self._lock:
            return self._record(me, step, stage, found)

    def report(self, step: int, stage: int, entries: Sequence[OutlierEntry]) -> list[OutlierEntry]:
        """Add findings made outside the all-reduce (e.g. a step claim the records do not back) at this node's
        ``step``: they are published and make offenders like the gradient findings; returns the new ones."""
        with self._lock:
            return self._record(self.identity.peer_id, step, stage, list(entries))

    def _record(self, me: PeerID, step: int, stage: int, found: list[OutlierEntry]) -> list[OutlierEntry]:
        """Keep the new findings of one round (the lock is held); returns them."""
        window = step // self.cfg.window_steps
        if window not in self._windows and self._known:
            self._dirty.add(window)  # a new window: restate the offenders caught earlier (see `flush`)
        self._windows.add(window)
        new = []
        for entry in found:
            key = (entry.peer, entry.reason)
            if PeerID(entry.peer) != me and key not in self._known:
                self._known[key] = entry
                new.append(entry)
                log.warning(
                    "%s: stage %d step %d: %s: %s (distance %.3g, median %.3g); reporting it",
                    me.short(),
                    stage,
                    step,
                    PeerID(entry.peer).short(),
                    entry.describe(),
                    entry.distance,
                    entry.median_distance,
                )
        if new:
            self._dirty.add(window)
        while len(self._windows) > self.cfg.max_windows_kept:
            self._windows.discard(min(self._windows))
        while len(self._known) > self.cfg.max_known_offenders:
            self._known.pop(next(iter(self._known)))
        self._rebuild_sets()
        return new

    def _replays_in(self, peer: PeerID, stage: int, step: int, start: int, values: torch.Tensor) -> list[OutlierEntry]:
        """Replay check of one sender's part, block by block at absolute flat offsets that are multiples of
        ``replay_block_numel``: spans move when the group changes, the blocks do not, so a replayed gradient is
        caught whichever part of it this node reduces. A part with no whole block is checked as a whole."""
        block = self.cfg.replay_block_numel
        first = -(-start // block) * block
        offsets = range(first, start + values.numel() - block + 1, block)
        pieces = [(f"{stage}@{o}", values[o - start : o - start + block]) for o in offsets] or [
            (f"{stage}:{start}", values)
        ]
        for key, piece in pieces:
            entry = self.replays.observe(peer, key, step, piece)
            if entry is not None:
                return [entry]
        return []

    def confirmed(self) -> frozenset[PeerID]:
        """The offenders that a quorum of peers reported (what the orchestrator flags)."""
        return self._confirmed

    def offenders(self) -> frozenset[PeerID]:
        """Every peer this node found sending outlier or replayed parts in the windows it remembers: the all-reduce
        leaves them out of the spans this node reduces, and this node never adopts their state."""
        return self._offenders

    async def refresh_reported(self, window: int) -> frozenset[PeerID]:
        """Read the reports of ``window`` and the one before from the DHT; peers reported by ``min_reporters``
        distinct others (the orchestrator's rule) become offenders here too, so this node's drivers stop routing
        microbatches through them even before the window is attested. Returns the newly added ones; the
        caller bounds it with a deadline."""
        me = self.identity.peer_id
        added = set()
        for w in range(max(window - 1, 0), window + 1):
            reports = await fetch_reports(self.store, self.cfg.run_id, w)
            for peer, reason in reported_peers(reports, self.cfg.min_reporters).items():
                if peer != me and peer not in self._reported:
                    with self._lock:
                        self._reported[peer] = reason
                        self._rebuild_sets()
                    added.add(peer)
                    log.warning(
                        "%s: %s was reported by a quorum of peers (%s); avoiding it", me.short(), peer.short(), reason
                    )
        return frozenset(added)

    async def flush(self, now: float | None = None) -> int:
        """Publish the signed report of every window that gained findings, or that this node reached while it
        knows offenders; returns how many were stored. A report restates every offender this node caught so far
        (with the first evidence): a caught peer is left out of this node's spans, so this node cannot catch it
        again, and flagging needs ``outlier_min_reporters`` reports in one window. The caller bounds it with a
        deadline; a window whose store fails is retried at the next flush."""
        stored = 0
        now = time.time() if now is None else now
        with self._lock:
            dirty, known = sorted(self._dirty), list(self._known.values())
        for window in dirty:
            entries = sorted(known, key=lambda e: (e.peer, e.reason))
            report = sign_report(self.identity, run_id=self.cfg.run_id, window=window, entries=entries)
            if await publish_report(self.store, report, now + self.cfg.report_ttl_s):
                with self._lock:
                    self._dirty.discard(window)
                stored += 1
            else:
                log.warning(
                    "%s: storing the outlier report of window %d found no peer; retrying",
                    self.identity.peer_id.short(),
                    window,
                )
        return stored
