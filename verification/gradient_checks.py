"""A training node's gradient checks: inspect the all-reduce parts it reduced, report outliers and replays.

Each owner of a span in the stage's all-reduce keeps every member's values of the first part(s) it reduces
(`swarm.averaging.AveragerConfig.inspect_parts`). After each round `GradientChecker.inspect` applies the stated
rule of `verification.outliers` to them: a sender far from the reduced center (``find_outliers``), or one that
sent bit-for-bit the values it sent for the same span at an earlier step (`ReplayDetector`). Findings are
gathered per window and `GradientChecker.flush` publishes one signed `OutlierReport` per window under the
node's own subkey (re-signed whenever the window gains an entry). The orchestrator zeroes and flags a peer
reported by ``outlier_min_reporters`` distinct peers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dht.identity import Identity, PeerID
from swarm.errors import ConfigError
from verification.common import RecordStore
from verification.outliers import OutlierConfig, OutlierEntry, ReplayDetector, find_outliers, publish_report, sign_report

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class InspectedValues(Protocol):
    """One reduced part (`swarm.averaging.allreduce.InspectedPart`): each member's values and the center."""

    start: int
    end: int
    values: Mapping[PeerID, torch.Tensor]
    center: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class GradientCheckConfig:
    """The run's window length, the outlier rule, and how long reports live in the DHT."""

    run_id: str
    window_steps: int
    outliers: OutlierConfig
    report_ttl_s: float = 3600.0
    max_windows_kept: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ConfigError(f"run_id must be a non-empty string, got {self.run_id!r}")
        if not isinstance(self.window_steps, int) or self.window_steps < 1:
            raise ConfigError(f"window_steps must be an int >= 1, got {self.window_steps!r}")
        if not isinstance(self.outliers, OutlierConfig):
            raise ConfigError(f"outliers must be an OutlierConfig, got {type(self.outliers).__name__}")
        if not isinstance(self.report_ttl_s, (int, float)) or not 0 < self.report_ttl_s <= 86400 * 30:
            raise ConfigError(f"report_ttl_s must be in (0, 2592000] seconds, got {self.report_ttl_s!r}")
        if not isinstance(self.max_windows_kept, int) or not 1 <= self.max_windows_kept <= 10_000:
            raise ConfigError(f"max_windows_kept must be an int in [1, 10000], got {self.max_windows_kept!r}")


class GradientChecker:
    """Finds outlier and replayed gradient parts among the senders of this node's spans; publishes reports."""

    def __init__(self, identity: Identity, cfg: GradientCheckConfig, store: RecordStore) -> None:
        self.identity = identity
        self.cfg = cfg
        self.store = store
        self.replays = ReplayDetector(cfg.outliers)
        self._entries: dict[int, dict[tuple[bytes, str], OutlierEntry]] = {}  # window -> (peer, reason) -> first
        self._dirty: set[int] = set()

    def inspect(self, step: int, stage: int, parts: Sequence[InspectedValues]) -> list[OutlierEntry]:
        """Apply the rule to one round's inspected parts; returns the new findings about other peers (CPU work:
        call it in a worker thread)."""
        me = self.identity.peer_id
        found: list[OutlierEntry] = []
        for part in parts:
            found += find_outliers(part.values, part.center, step, self.cfg.outliers)
            for peer, values in sorted(part.values.items()):
                if peer != me:
                    entry = self.replays.observe(peer, f"{stage}:{part.start}:{part.end}", step, values)
                    if entry is not None:
                        found.append(entry)
        window = step // self.cfg.window_steps
        kept = self._entries.setdefault(window, {})
        new = []
        for entry in found:
            key = (entry.peer, entry.reason)
            if PeerID(entry.peer) != me and key not in kept:
                kept[key] = entry
                new.append(entry)
                log.warning("%s: stage %d step %d: %s sent a %s gradient part (distance %.3g, median %.3g); reporting it",
                            me.short(), stage, step, PeerID(entry.peer).short(), entry.reason, entry.distance,
                            entry.median_distance)
        if new:
            self._dirty.add(window)
        while len(self._entries) > self.cfg.max_windows_kept:
            self._entries.pop(min(self._entries))
        return new

    async def flush(self, now: float | None = None) -> int:
        """Publish the signed report of every window that gained findings; returns how many were stored. The
        caller bounds it with a deadline; a window whose store fails is retried at the next flush."""
        stored = 0
        now = time.time() if now is None else now
        for window in sorted(self._dirty):
            entries = sorted(self._entries.get(window, {}).values(), key=lambda e: (e.peer, e.reason))
            report = sign_report(self.identity, run_id=self.cfg.run_id, window=window, entries=entries)
            if await publish_report(self.store, report, now + self.cfg.report_ttl_s):
                self._dirty.discard(window)
                stored += 1
            else:
                log.warning("%s: storing the outlier report of window %d found no peer; retrying",
                            self.identity.peer_id.short(), window)
        return stored
