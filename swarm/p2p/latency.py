"""How long this node's outgoing RPCs take, per method (`CallLatency`): cumulative histogram counts.

The transport observes each `Transport.call` (request to typed reply, the dial included) and each
`Transport.open_stream` (request to the reply header) once it ends, with whether it succeeded. The counts are
plain numbers; `swarm.observe.metrics` turns them into Prometheus histograms at scrape time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the histogram buckets; a last, unbounded bucket holds the rest."""


@dataclass
class MethodLatency:
    """One method's calls: counts per bucket (not cumulative; the last is the overflow), their sum, the failures."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    count: int = 0
    sum_s: float = 0.0
    errors: int = 0

    def copy(self) -> MethodLatency:
        return MethodLatency(list(self.bucket_counts), self.count, self.sum_s, self.errors)


class CallLatency:
    """The latency counters of one transport's outgoing calls, by method name (names come from this node's code)."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodLatency] = {}

    def observe(self, method: str, duration_s: float, *, ok: bool) -> None:
        entry = self._methods.get(method)
        if entry is None:
            entry = self._methods[method] = MethodLatency()
        entry.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1
        entry.count += 1
        entry.sum_s += max(duration_s, 0.0)
        if not ok:
            entry.errors += 1

    def snapshot(self) -> dict[str, MethodLatency]:
        """A copy of every method's counters, sorted by method."""
        return {m: e.copy() for m, e in sorted(self._methods.items())}
