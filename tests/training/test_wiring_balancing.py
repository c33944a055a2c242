"""Wiring (EMA-weighted choice, probing, bans with backoff, retry), balancing and progress (pure logic)."""

from __future__ import annotations

import random

import pytest

from swarm.training.balancing import BalanceConfig, StagePeer, choose_move, choose_stage
from swarm.errors import ConfigError, TransportError
from swarm.training.progress import ProgressRecord, parse_records, step_samples
from swarm.training.wiring import NoPeerError, PeerSelector, WiringConfig, call_with_retry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_new_peer_is_probed_first_then_choice_follows_throughput() -> None:
    sel: PeerSelector[str] = PeerSelector(WiringConfig(), clock=Clock(), rng=random.Random(0))
    sel.report_success("fast", 90, 1.0)
    sel.report_success("slow", 10, 1.0)
    assert sel.choose(["fast", "slow", "new"]) == "new"
    picks = [sel.choose(["fast", "slow"]) for _ in range(1000)]
    assert 850 < picks.count("fast") < 950


def test_failures_ban_with_exponential_backoff() -> None:
    clock = Clock()
    sel: PeerSelector[str] = PeerSelector(
        WiringConfig(ban_base_s=1.0, ban_max_s=4.0), clock=clock, rng=random.Random(0)
    )
    assert [sel.report_failure("a") for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert sel.is_banned("a")
    with pytest.raises(NoPeerError):
        sel.choose(["a"])
    clock.now = 4.5
    assert sel.choose(["a"]) == "a"
    sel.report_success("a", 1, 1.0)
    assert sel.report_failure("a") == 1.0


async def test_call_with_retry_routes_around_a_failing_peer() -> None:
    sel: PeerSelector[str] = PeerSelector(WiringConfig(), clock=Clock(), rng=random.Random(1))
    calls: list[str] = []

    async def call(peer: str) -> str:
        calls.append(peer)
        if peer == "dead":
            raise TransportError("connection refused")
        return f"ok from {peer}"

    sel.report_success("alive", 1, 1.0)
    peer, result = await call_with_retry(sel, lambda: ["dead", "alive"], call, num_samples=1, what="forward")
    assert (peer, result) == ("alive", "ok from alive")
    assert calls[0] == "dead" and sel.is_banned("dead")
    with pytest.raises(NoPeerError):
        await call_with_retry(sel, lambda: ["dead"], call, num_samples=1, what="forward")


def test_wiring_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="ema_alpha"):
        WiringConfig(ema_alpha=0)


def test_joining_node_fills_the_weakest_stage() -> None:
    peers = [
        StagePeer(peer="a", stage=0, throughput=10),
        StagePeer(peer="b", stage=1, throughput=4),
        StagePeer(peer="c", stage=1, throughput=3),
    ]
    assert choose_stage(peers, 2, my_speed=5) == 1
    assert choose_stage(peers, 3, my_speed=5) == 2  # an empty stage first
    with pytest.raises(ConfigError, match="stage_costs"):
        choose_stage(peers, 2, my_speed=5, stage_costs=[1.0])


def test_move_rule_needs_a_clear_margin_and_never_empties_a_stage() -> None:
    cfg = BalanceConfig()
    peers = [StagePeer(peer=p, stage=0, throughput=10) for p in "abc"] + [StagePeer(peer="d", stage=1, throughput=10)]
    assert choose_move(peers, 2, me="a", cfg=cfg) == 1  # min 10 -> 20
    assert choose_move(peers, 2, me="d", cfg=cfg) is None  # d is alone on stage 1
    balanced = [
        StagePeer(peer="a", stage=0, throughput=10),
        StagePeer(peer="b", stage=0, throughput=10),
        StagePeer(peer="c", stage=1, throughput=9),
        StagePeer(peer="d", stage=1, throughput=9),
    ]
    assert choose_move(balanced, 2, me="a", cfg=cfg) is None  # 18 -> 10: worse
    slight = [
        StagePeer(peer="a", stage=0, throughput=3),
        StagePeer(peer="b", stage=0, throughput=10),
        StagePeer(peer="c", stage=1, throughput=11),
    ]
    assert choose_move(slight, 2, me="a", cfg=cfg) is None  # 11 -> 10: no move since min gets worse


def test_progress_sums_per_step_and_skips_malformed_records() -> None:
    records = parse_records(
        [
            ("a", ProgressRecord(step=3, samples=40, samples_per_s=1.0).to_wire()),
            ("b", ProgressRecord(step=3, samples=30, samples_per_s=1.0).to_wire()),
            ("c", ProgressRecord(step=2, samples=64, samples_per_s=1.0).to_wire()),
            ("d", {"step": "three"}),
            ("e", {"step": -1, "samples": 0, "samples_per_s": 0.0}),
        ]
    )
    assert set(records) == {"a", "b", "c"}
    assert step_samples(records.values(), 3) == 70
