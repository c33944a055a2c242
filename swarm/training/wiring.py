"""Stochastic wiring: choose the next-stage peer weighted by measured throughput; ban failures with backoff.

Each peer has an exponential moving average of its measured throughput (samples/s). `PeerSelector.choose`
picks among the unbanned peers of a stage with probability proportional to that EMA; a peer never measured
is probed first (new peers are tried soon). A failed or timed-out peer is banned for
``ban_base_s * 2**(failures-1)`` (capped at ``ban_max_s``); a success resets its failure count. The clock and
the random generator are injected so tests are deterministic.

Adaptive deadlines: a peer whose link went dark (a Wi-Fi blip drops every packet) answers nothing, and without them
each call to it would wait out the transport's whole ``rpc_timeout_s`` before the wiring bans it. Each peer keeps its
last ``deadline_window`` answered call times per kind of call (forward, backward, ...); once it has answered
``deadline_min_samples`` of a kind, a call of that kind is cut at ``max(deadline_floor_s, deadline_factor x p90)``,
doubled for each deadline the peer missed in a row (a slow but live peer gets more time, and its slow answers then
raise its p90), and never beyond the RPC's own deadline (the call's own timeout stays in force). A missed deadline is
a failure like any other: a ban, and the request goes to another peer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from swarm.configs import Config, setting
from swarm.errors import NotFoundError, SwarmError

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)
R = TypeVar("R")

MAX_DEADLINE_DOUBLINGS = 6  # a peer that keeps missing its deadline gets at most 64x it (the RPC's own caps it)


class NoPeerError(NotFoundError):
    """No unbanned peer serves the stage right now; wait for one to join or move there."""

    code = "no_peer"


class WiringConfig(Config, section="wiring"):
    """EMA smoothing, ban backoff, and how many peers one request may try."""

    ema_alpha: float = setting(default=0.3, gt=0, le=1, doc="Weight of a new measurement in a peer's throughput EMA.")
    ban_base_s: float = setting(default=1.0, gt=0, le=3600, doc="Ban after a peer's first failure; doubles each time.")
    ban_max_s: float = setting(default=60.0, le=86400, doc="Longest ban (>= ban_base_s).")
    max_attempts: int = setting(default=4, ge=1, le=100, doc="Peers one request may try.")
    adaptive_deadlines: bool = setting(
        default=True, doc="Cut a call at its peer's adaptive deadline (off: only the RPC's own deadline)."
    )
    deadline_floor_s: float = setting(
        default=3.0,
        gt=0,
        le=3600,
        doc="Shortest adaptive deadline of one call (above a stage server's 2 s hold of a next-step request).",
    )
    deadline_factor: float = setting(
        default=4.0, ge=1, le=1000, doc="An adaptive deadline is this many times the peer's recent p90 call time."
    )
    deadline_window: int = setting(
        default=16, ge=1, le=10_000, doc="Recent answered call times per peer and kind the p90 is taken over."
    )
    deadline_min_samples: int = setting(
        default=4, ge=1, le=10_000, doc="Answers of a kind a peer must have given before its deadline applies."
    )

    def validate(self) -> None:
        if self.ban_max_s < self.ban_base_s:
            raise self.invalid("ban_max_s", f"must be in [ban_base_s, 86400], got {self.ban_max_s!r}")
        if self.deadline_min_samples > self.deadline_window:
            raise self.invalid(
                "deadline_min_samples", f"must be at most deadline_window, got {self.deadline_min_samples!r}"
            )


@dataclass
class PeerStats:
    """What this node measured about one peer."""

    throughput_ema: float | None = None
    failures: int = 0
    banned_until: float = 0.0
    successes: int = 0
    call_times_s: dict[str, deque[float]] = field(default_factory=dict)  # recent answered calls, by kind
    missed_deadlines: int = 0  # adaptive deadlines missed in a row (each doubles the next one)

    def call_time_p90_s(self, kind: str, min_samples: int) -> float | None:
        """The 90th percentile of the recent answered calls of ``kind`` (None with fewer than ``min_samples``)."""
        times = self.call_times_s.get(kind)
        if times is None or len(times) < min_samples:
            return None
        ordered = sorted(times)
        return ordered[math.ceil(0.9 * len(ordered)) - 1]


@dataclass
class PeerSelector(Generic[P]):
    """Per-stage peer choice with throughput EMAs and exponential-backoff bans."""

    cfg: WiringConfig
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    stats: dict[P, PeerStats] = field(default_factory=dict)

    def choose(self, candidates: Iterable[P], *, exclude: Iterable[P] = ()) -> P:
        """A peer among ``candidates``: unmeasured ones first, else weighted by throughput EMA."""
        excluded = set(exclude)
        now = self.clock()
        usable = [p for p in candidates if p not in excluded and self.stats.get(p, PeerStats()).banned_until <= now]
        if not usable:
            raise NoPeerError("no usable peer (all banned, excluded or none known)")
        fresh = [p for p in usable if self.stats.get(p, PeerStats()).throughput_ema is None]
        if fresh:
            return self.rng.choice(fresh)
        weights = [max(self.stats[p].throughput_ema or 0.0, 1e-9) for p in usable]
        return self.rng.choices(usable, weights=weights, k=1)[0]

    def report_success(self, peer: P, num_samples: int, elapsed_s: float) -> None:
        """Fold one measurement (samples in ``elapsed_s``) into the peer's EMA; clear its failures."""
        stats = self.stats.setdefault(peer, PeerStats())
        rate = num_samples / max(elapsed_s, 1e-6)
        a = self.cfg.ema_alpha
        stats.throughput_ema = rate if stats.throughput_ema is None else (1 - a) * stats.throughput_ema + a * rate
        stats.failures = 0
        stats.successes += 1

    def report_call_time(self, peer: P, kind: str, elapsed_s: float) -> None:
        """``peer`` answered a call of ``kind`` in ``elapsed_s``: it feeds the peer's adaptive deadline."""
        stats = self.stats.setdefault(peer, PeerStats())
        times = stats.call_times_s.get(kind)
        if times is None:
            times = stats.call_times_s[kind] = deque(maxlen=self.cfg.deadline_window)
        times.append(elapsed_s)
        stats.missed_deadlines = 0

    def deadline_s(self, peer: P, kind: str) -> float | None:
        """How long a call of ``kind`` to ``peer`` may take (see the module's doc); None: only the RPC's deadline."""
        stats = self.stats.get(peer)
        if not self.cfg.adaptive_deadlines or stats is None:
            return None
        p90_s = stats.call_time_p90_s(kind, self.cfg.deadline_min_samples)
        if p90_s is None:
            return None
        base_s = max(self.cfg.deadline_floor_s, self.cfg.deadline_factor * p90_s)
        return base_s * 2 ** min(stats.missed_deadlines, MAX_DEADLINE_DOUBLINGS)

    def report_failure(self, peer: P, *, missed_deadline: bool = False) -> float:
        """Ban the peer with exponential backoff; returns the ban duration in seconds. ``missed_deadline``: it
        missed its adaptive deadline (the next one doubles until it answers)."""
        stats = self.stats.setdefault(peer, PeerStats())
        stats.failures += 1
        if missed_deadline:
            stats.missed_deadlines += 1
        duration = min(self.cfg.ban_base_s * 2 ** (stats.failures - 1), self.cfg.ban_max_s)
        stats.banned_until = self.clock() + duration
        return duration

    def is_banned(self, peer: P) -> bool:
        return self.stats.get(peer, PeerStats()).banned_until > self.clock()

    def throughput(self, peer: P) -> float | None:
        stats = self.stats.get(peer)
        return stats.throughput_ema if stats else None


async def call_within_deadline(
    selector: PeerSelector[P],
    peer: P,
    call: Callable[[P], Awaitable[R]],
    *,
    kind: str,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[R, float]:
    """Run ``call(peer)`` cut at the peer's adaptive deadline for ``kind``; returns (result, elapsed seconds) and
    records the time. A missed deadline raises `PeerDeadlineError` (the caller reports the failure)."""
    deadline_s = selector.deadline_s(peer, kind)
    started = clock()
    if deadline_s is None:
        result = await call(peer)
    else:
        try:
            async with asyncio.timeout(deadline_s):
                result = await call(peer)
        except TimeoutError:
            raise PeerDeadlineError(
                f"{_short(peer)} did not answer a {kind} within its adaptive deadline of {deadline_s:.1f}s"
            ) from None
    elapsed_s = clock() - started
    selector.report_call_time(peer, kind, elapsed_s)
    return result, elapsed_s


class PeerDeadlineError(SwarmError):
    """A peer did not answer within its adaptive deadline (its recent call times say it should have)."""

    code = "peer_deadline"


async def call_with_retry(
    selector: PeerSelector[P],
    candidates: Callable[[], Iterable[P]],
    call: Callable[[P], Awaitable[R]],
    *,
    num_samples: int,
    what: str,
    kind: str = "call",
    clock: Callable[[], float] = time.perf_counter,
    passthrough: tuple[type[BaseException], ...] = (),
) -> tuple[P, R]:
    """Run ``call`` on a chosen peer, cut at its adaptive deadline for ``kind``; on failure ban it and retry on
    another, up to ``max_attempts``.

    Returns (peer, result). Errors in ``passthrough`` (e.g. a stale step) propagate at once without a ban.
    Raises NoPeerError when no usable peer remains, or the last error.
    """
    tried: list[P] = []
    last_error: BaseException | None = None
    for _ in range(selector.cfg.max_attempts):
        try:
            peer = selector.choose(candidates(), exclude=tried)
        except NoPeerError:
            break
        tried.append(peer)
        try:
            result, elapsed_s = await call_within_deadline(selector, peer, call, kind=kind, clock=clock)
        except passthrough:
            raise
        except (SwarmError, TimeoutError, OSError) as e:
            ban_s = selector.report_failure(peer, missed_deadline=isinstance(e, PeerDeadlineError))
            log.warning(
                "%s on %s failed (%s: %s); banned for %.1f s, retrying on another peer",
                what,
                _short(peer),
                type(e).__name__,
                e,
                ban_s,
            )
            last_error = e
            continue
        selector.report_success(peer, num_samples, elapsed_s)
        return peer, result
    if last_error is not None:
        raise last_error
    raise NoPeerError(f"{what}: no usable peer serves this stage now; waiting for one to join or move there")


def _short(peer: object) -> str:
    short = getattr(peer, "short", None)
    return short() if callable(short) else str(peer)
