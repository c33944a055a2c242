"""Stochastic wiring: choose the next-stage peer weighted by measured throughput; ban failures with backoff.

Each peer has an exponential moving average of its measured throughput (samples/s). `PeerSelector.choose`
picks among the unbanned peers of a stage with probability proportional to that EMA; a peer never measured
is probed first (new peers are tried soon). A failed or timed-out peer is banned for
``ban_base_s * 2**(failures-1)`` (capped at ``ban_max_s``); a success resets its failure count. The clock and
the random generator are injected so tests are deterministic.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from swarm.configs import Config, setting
from swarm.errors import NotFoundError, SwarmError

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)
R = TypeVar("R")


class NoPeerError(NotFoundError):
    """No unbanned peer serves the stage right now; wait for one to join or move there."""

    code = "no_peer"


class WiringConfig(Config, section="wiring"):
    """EMA smoothing, ban backoff, and how many peers one request may try."""

    ema_alpha: float = setting(default=0.3, gt=0, le=1, doc="Weight of a new measurement in a peer's throughput EMA.")
    ban_base_s: float = setting(default=1.0, gt=0, le=3600, doc="Ban after a peer's first failure; doubles each time.")
    ban_max_s: float = setting(default=60.0, le=86400, doc="Longest ban (>= ban_base_s).")
    max_attempts: int = setting(default=4, ge=1, le=100, doc="Peers one request may try.")

    def validate(self) -> None:
        if self.ban_max_s < self.ban_base_s:
            raise self.invalid("ban_max_s", f"must be in [ban_base_s, 86400], got {self.ban_max_s!r}")


@dataclass
class PeerStats:
    """What this node measured about one peer."""

    throughput_ema: float | None = None
    failures: int = 0
    banned_until: float = 0.0
    successes: int = 0


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

    def report_failure(self, peer: P) -> float:
        """Ban the peer with exponential backoff; returns the ban duration in seconds."""
        stats = self.stats.setdefault(peer, PeerStats())
        stats.failures += 1
        duration = min(self.cfg.ban_base_s * 2 ** (stats.failures - 1), self.cfg.ban_max_s)
        stats.banned_until = self.clock() + duration
        return duration

    def is_banned(self, peer: P) -> bool:
        return self.stats.get(peer, PeerStats()).banned_until > self.clock()

    def throughput(self, peer: P) -> float | None:
        stats = self.stats.get(peer)
        return stats.throughput_ema if stats else None


async def call_with_retry(
    selector: PeerSelector[P],
    candidates: Callable[[], Iterable[P]],
    call: Callable[[P], Awaitable[R]],
    *,
    num_samples: int,
    what: str,
    clock: Callable[[], float] = time.perf_counter,
    passthrough: tuple[type[BaseException], ...] = (),
) -> tuple[P, R]:
    """Run ``call`` on a chosen peer; on failure ban it and retry on another, up to ``max_attempts``.

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
        started = clock()
        try:
            result = await call(peer)
        except passthrough:
            raise
        except (SwarmError, TimeoutError, OSError) as e:
            ban_s = selector.report_failure(peer)
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
        selector.report_success(peer, num_samples, clock() - started)
        return peer, result
    if last_error is not None:
        raise last_error
    raise NoPeerError(f"{what}: no usable peer serves this stage now; waiting for one to join or move there")


def _short(peer: object) -> str:
    short = getattr(peer, "short", None)
    return short() if callable(short) else str(peer)
