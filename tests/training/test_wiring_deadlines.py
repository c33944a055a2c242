"""Adaptive per-peer deadlines of the wiring: a peer gone dark is routed around within a few of its call times."""

from __future__ import annotations

import asyncio
import random

import pytest

from swarm.errors import ConfigError
from swarm.training.wiring import PeerDeadlineError, PeerSelector, WiringConfig, call_with_retry


class Clock:
    """A clock the test moves: each call's measured time is exactly what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _selector(**overrides: object) -> PeerSelector[str]:
    return PeerSelector(WiringConfig(**overrides), clock=Clock(), rng=random.Random(0))  # type: ignore[arg-type]


def test_deadline_is_floor_or_factor_times_p90_once_measured() -> None:
    sel = _selector(deadline_floor_s=1.0, deadline_factor=4.0, deadline_window=10, deadline_min_samples=3)
    assert sel.deadline_s("a", "forward") is None  # never measured: only the RPC's own deadline
    sel.report_call_time("a", "forward", 0.1)
    sel.report_call_time("a", "forward", 0.1)
    assert sel.deadline_s("a", "forward") is None  # fewer than deadline_min_samples
    sel.report_call_time("a", "forward", 0.1)
    assert sel.deadline_s("a", "forward") == 1.0  # 4 x 0.1 is below the floor
    for t in [0.5] * 7:
        sel.report_call_time("a", "forward", t)
    assert sel.deadline_s("a", "forward") == 2.0  # p90 of [0.1 x3, 0.5 x7] is 0.5
    assert sel.deadline_s("a", "backward") is None  # per kind of call
    assert sel.deadline_s("b", "forward") is None  # per peer


def test_p90_follows_the_window_and_ignores_one_outlier() -> None:
    sel = _selector(deadline_floor_s=0.01, deadline_factor=2.0, deadline_window=20, deadline_min_samples=1)
    for t in [0.2] * 19 + [5.0]:
        sel.report_call_time("a", "forward", t)
    assert sel.deadline_s("a", "forward") == pytest.approx(0.4)  # one slow answer in 20 is above the p90
    for _ in range(20):  # the peer became slower: the window forgets the old times
        sel.report_call_time("a", "forward", 1.0)
    assert sel.deadline_s("a", "forward") == pytest.approx(2.0)


def test_missed_deadlines_double_the_next_one_until_an_answer() -> None:
    sel = _selector(deadline_floor_s=1.0, deadline_min_samples=1)
    sel.report_call_time("slow", "forward", 0.1)
    assert [sel.deadline_s("slow", "forward")] == [1.0]
    sel.report_failure("slow", missed_deadline=True)
    assert sel.deadline_s("slow", "forward") == 2.0
    sel.report_failure("slow", missed_deadline=True)
    assert sel.deadline_s("slow", "forward") == 4.0
    sel.report_failure("slow")  # another failure (a refused connection) does not relax it
    assert sel.deadline_s("slow", "forward") == 4.0
    for _ in range(20):
        sel.report_failure("slow", missed_deadline=True)
    assert sel.deadline_s("slow", "forward") == 64.0  # at most 2**6 times (the RPC's own deadline caps it anyway)
    sel.report_call_time("slow", "forward", 1.5)  # it answered: back to its (now higher) call times
    assert sel.deadline_s("slow", "forward") == pytest.approx(4 * 1.5)


def test_adaptive_deadlines_can_be_turned_off() -> None:
    sel = _selector(adaptive_deadlines=False, deadline_min_samples=1)
    sel.report_call_time("a", "forward", 0.1)
    assert sel.deadline_s("a", "forward") is None


def test_deadline_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="deadline_floor_s"):
        WiringConfig(deadline_floor_s=0)
    with pytest.raises(ConfigError, match="deadline_factor"):
        WiringConfig(deadline_factor=0.5)
    with pytest.raises(ConfigError, match="deadline_min_samples"):
        WiringConfig(deadline_window=4, deadline_min_samples=5)


async def test_a_peer_gone_dark_is_cut_at_its_deadline_and_routed_around() -> None:
    """Peer "dark" answered fast before, then never answers: the call is cut at its deadline (0.2 s here, far
    below the 60 s the call itself would wait), it is banned, and the call goes to "alive"."""
    clock = Clock()
    sel: PeerSelector[str] = PeerSelector(
        WiringConfig(deadline_floor_s=0.2, deadline_min_samples=2), clock=clock, rng=random.Random(0)
    )
    dark = asyncio.Event()
    calls: list[str] = []

    async def call(peer: str) -> str:
        calls.append(peer)
        if peer == "dark" and dark.is_set():
            await asyncio.sleep(60)  # the link drops every packet: no answer (the RPC's own deadline is far)
        clock.now += 0.01  # each answer takes 10 ms by the injected clock
        return peer

    for _ in range(3):
        await call_with_retry(sel, lambda: ["dark"], call, num_samples=1, what="forward", kind="forward", clock=clock)
    sel.report_success("alive", 1, 10.0)  # measured, but 50x slower by throughput: "dark" is chosen first
    dark.set()
    async with asyncio.timeout(10):
        peer, result = await call_with_retry(
            sel, lambda: ["dark", "alive"], call, num_samples=1, what="forward", kind="forward", clock=clock
        )
    assert (peer, result) == ("alive", "alive")
    assert calls[-2:] == ["dark", "alive"]
    assert sel.is_banned("dark") and sel.stats["dark"].missed_deadlines == 1
    with pytest.raises(PeerDeadlineError):  # alone (the ban over), it fails at its doubled deadline: 0.4 s
        sel.stats["dark"].banned_until = 0.0
        async with asyncio.timeout(10):
            await call_with_retry(sel, lambda: ["dark"], call, num_samples=1, what="forward", kind="forward")
    assert sel.stats["dark"].missed_deadlines == 2
