"""Gradient checks: the outlier rule, replay detection, signed reports, and their effect on rewards."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch
from verif_helpers import MemoryStore, make_identity

from swarm.p2p.identity import PeerID
from swarm.averaging.reducer import centered_clip
from swarm.errors import ConfigError
from swarm.verification.attestation import GENESIS_DIGEST, build_attestation, verify_attestation
from swarm.verification.common import digest_parts
from swarm.verification.gradient_checks import GradientCheckConfig, GradientChecker
from swarm.verification.outliers import (
    OutlierConfig,
    ReplayDetector,
    fetch_reports,
    find_outliers,
    publish_report,
    reported_peers,
    sign_report,
)
from swarm.verification.receipts import ReceiptBatch, WorkClaim, sign_ack, sign_receipt
from swarm.verification.rewards import RewardConfig, compute_rewards

RUN = "run-outliers"
CFG = OutlierConfig()


def honest_parts(peers, seed: int, dim: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(dim, generator=g)
    # heterogeneous honest noise: each peer's minibatch gradient has its own noise level (0.5x..3x the signal)
    return {p: true + torch.randn(dim, generator=g) * (0.5 + 2.5 * i / len(peers)) for i, p in enumerate(peers)}


def test_sign_flip_is_an_outlier_and_honest_parts_never_are():
    peers = [make_identity(f"p{i}").peer_id for i in range(8)]
    for seed in range(200):
        parts = honest_parts(peers, seed)
        center = centered_clip(list(parts.values()), [1.0] * 8, tau=5.0, iterations=20)
        assert find_outliers(parts, center, seed, CFG) == []
    parts = honest_parts(peers, 999)
    for cheater in peers[:2]:
        parts[cheater] = parts[cheater] * -1000.0
    center = centered_clip(list(parts.values()), [1.0] * 8, tau=5.0, iterations=20)
    found = find_outliers(parts, center, 7, CFG)
    assert sorted(e.peer for e in found) == sorted(p.to_bytes() for p in peers[:2])
    assert all(e.reason == "outlier" and e.step == 7 for e in found)
    assert find_outliers(dict(list(parts.items())[:2]), center, 7, CFG) == []  # too few senders to judge


def test_replayed_parts_are_detected_exactly():
    det = ReplayDetector(OutlierConfig(replay_memory_steps=4))
    peer = make_identity("r").peer_id
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, generator=g)
    assert det.observe(peer, "span-0", 1, old) is None
    assert det.observe(peer, "span-0", 2, torch.randn(64, generator=g)) is None
    hit = det.observe(peer, "span-0", 3, old.clone())
    assert hit is not None and hit.reason == "replayed" and hit.step == 3
    assert det.observe(peer, "span-1", 3, old.clone()) is None  # another span: not the same part
    assert det.observe(peer, "span-0", 20, old.clone()) is None  # forgotten after replay_memory_steps
    zeros = torch.zeros(64)  # an honest peer behind a stage that returned zero gradients: no evidence
    assert det.observe(peer, "span-2", 21, zeros) is None and det.observe(peer, "span-2", 22, zeros.clone()) is None


async def test_reports_round_trip_and_need_distinct_reporters(caplog):
    store = MemoryStore()
    cheater, *honest = [make_identity(f"m{i}") for i in range(5)]
    entries = find_outliers(
        {h.peer_id: torch.ones(8) for h in honest} | {cheater.peer_id: -1000 * torch.ones(8)}, torch.ones(8), 3, CFG
    )
    for reporter in honest[:2]:
        await publish_report(store, sign_report(reporter, run_id=RUN, window=0, entries=entries), 1e9)
    # the cheater reports an honest peer; one reporter is not enough
    lie = find_outliers(
        {h.peer_id: torch.ones(8) for h in honest[1:]} | {honest[0].peer_id: 99 * torch.ones(8)}, torch.ones(8), 3, CFG
    )
    await publish_report(store, sign_report(cheater, run_id=RUN, window=0, entries=lie), 1e9)
    await store.store(f"{RUN}/outliers/0", b"\x00junk", 1e9, subkey="[owner:zzz]")
    reports = await fetch_reports(store, RUN, 0)
    assert set(reports) == {honest[0].peer_id, honest[1].peer_id, cheater.peer_id}
    assert "malformed outlier report" in caplog.text
    assert set(reported_peers(reports, 2)) == {cheater.peer_id}


def test_reported_peer_gets_zero_and_the_attestation_verifies():
    cheater, a, caller, r1, r2, orch = [make_identity(f"x{i}") for i in range(6)]
    receipts = []
    for server in (cheater, a):
        claim = WorkClaim(
            run_id=RUN,
            step=1,
            stage=0,
            server=server.peer_id.to_bytes(),
            caller=caller.peer_id.to_bytes(),
            microbatch_id=f"mb-{server.peer_id.short()}",
            kind="forward",
            input_hash=digest_parts([b"i"]),
            output_hash=digest_parts([b"o"]),
            num_samples=3,
        )
        receipts.append(sign_receipt(caller, claim, sign_ack(server, claim)))
    rb = {caller.peer_id: ReceiptBatch(run_id=RUN, window=0, publisher=caller.peer_id.to_bytes(), receipts=receipts)}
    entries = find_outliers(
        {a.peer_id: torch.ones(4), r1.peer_id: torch.ones(4), cheater.peer_id: -1e3 * torch.ones(4)},
        torch.ones(4),
        1,
        CFG,
    )
    reports = {r.peer_id: sign_report(r, run_id=RUN, window=0, entries=entries) for r in (r1, r2)}
    cfg = RewardConfig(window_steps=10)
    out = compute_rewards(RUN, 0, rb, {}, [], cfg, reports)
    assert out.shares == {a.peer_id: 1.0, cheater.peer_id: 0.0} and out.flagged == {cheater.peer_id}
    att = build_attestation(
        orch,
        run_id=RUN,
        window=0,
        term=1,
        cfg=cfg,
        outcome=out,
        receipts=rb,
        verdicts={},
        prev_digest=GENESIS_DIGEST,
        issued_at=1.0,
        reports=reports,
    )
    assert verify_attestation(att, run_id=RUN, window=0, prev=None, receipts=rb, verdicts={}, reports=reports) == []
    assert verify_attestation(att, run_id=RUN, window=0, prev=None, receipts=rb, verdicts={}, reports={})


def test_centered_clip_keeps_training_within_5_percent_with_2_of_8_sign_flippers():
    """Linear regression by 8 peers; 2 send gradients x(-1000). With CenteredClip (tau 0.05) the held-out loss
    stays within 5% of the honest run's; with a plain mean the attacked run diverges."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(32, generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 32, generator=g)
        return x, x @ w_true + 0.1 * torch.randn(n, generator=g)

    data = [batch(256) for _ in range(8)]
    x_test, y_test = batch(1024)

    def train(cheaters: int, reduce) -> float:
        w = torch.zeros(32)
        for _ in range(100):
            grads = [2 * x.T @ (x @ w - y) / len(y) for x, y in data]
            grads = [gr * -1000.0 if i < cheaters else gr for i, gr in enumerate(grads)]
            w = w - 0.05 * reduce(grads).float()
        return float(((x_test @ w - y_test) ** 2).mean())

    mean = lambda grads: torch.stack(grads).mean(0)  # noqa: E731
    clip = lambda grads: centered_clip(grads, [1.0] * len(grads), tau=0.05, iterations=20)  # noqa: E731
    honest = train(0, mean)
    assert train(2, clip) == pytest.approx(honest, rel=0.05)
    assert not train(2, mean) <= 10 * honest


def test_outlier_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="distance_ratio"):
        OutlierConfig(distance_ratio=0.5)
    with pytest.raises(ConfigError, match="min_senders"):
        OutlierConfig(min_senders=2)


@dataclass(frozen=True)
class _Part:
    start: int
    end: int
    values: dict
    center: torch.Tensor


async def test_gradient_checker_reports_sign_flip_and_replay_once_per_window(identities, memory_store, caplog):
    """A node's checks over its reduced all-reduce parts: the sign-flipper and the replayer are reported in a
    signed report per window (each once), honest senders never; the published report counts toward flagging."""
    me, honest, flipper, replayer = identities[:4]
    cfg = GradientCheckConfig(run_id="run", window_steps=5, outliers=OutlierConfig())
    checker = GradientChecker(me, cfg, memory_store)
    gen = torch.Generator().manual_seed(5)
    stale = torch.randn(64, generator=gen)
    for step in range(3):
        grads = {p.peer_id: torch.randn(64, generator=gen) for p in (me, honest)}
        grads[flipper.peer_id] = -1000.0 * torch.randn(64, generator=gen)
        grads[replayer.peer_id] = stale.clone()
        center = centered_clip(list(grads.values()), [1.0] * len(grads), tau=5.0, iterations=20)
        new = checker.inspect(step, 0, [_Part(start=0, end=64, values=grads, center=center)])
        reasons = sorted((PeerID(e.peer), e.reason) for e in new)
        if step == 0:
            assert reasons == [(flipper.peer_id, "outlier")]
        elif step == 1:
            assert reasons == [(replayer.peer_id, "replayed")]
        else:
            assert reasons == []  # already reported in this window
    async with asyncio.timeout(5):
        assert await checker.flush(now=1000.0) == 1
        assert await checker.flush(now=1001.0) == 0  # nothing new
        reports = await fetch_reports(memory_store, "run", 0)
    report = reports[me.peer_id]
    assert report.is_valid()
    assert sorted((PeerID(e.peer), e.reason) for e in report.entries) == sorted(
        [(flipper.peer_id, "outlier"), (replayer.peer_id, "replayed")]
    )
    assert honest.peer_id not in {PeerID(e.peer) for e in report.entries}
    # a later window: the offenders are restated (this node leaves them out of its spans, so it cannot catch
    # them again, and flagging needs enough reporters within one window)
    honest_only = {p.peer_id: torch.randn(64, generator=gen) for p in (me, honest)}
    assert checker.inspect(7, 0, [_Part(start=0, end=64, values=honest_only, center=honest_only[me.peer_id])]) == []
    async with asyncio.timeout(5):
        assert await checker.flush(now=1002.0) == 1
        later = (await fetch_reports(memory_store, "run", 1))[me.peer_id]
    assert {PeerID(e.peer) for e in later.entries} == {flipper.peer_id, replayer.peer_id}


def test_gradient_check_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="window_steps"):
        GradientCheckConfig(run_id="run", window_steps=0, outliers=OutlierConfig())
    with pytest.raises(ConfigError, match="report_ttl_s"):
        GradientCheckConfig(run_id="run", window_steps=5, outliers=OutlierConfig(), report_ttl_s=-1)


def test_gradient_checker_offenders_are_the_peers_it_found(identities, memory_store):
    me, honest, flipper = identities[:3]
    checker = GradientChecker(
        me, GradientCheckConfig(run_id="run", window_steps=5, outliers=OutlierConfig()), memory_store
    )
    assert checker.offenders() == frozenset()
    gen = torch.Generator().manual_seed(9)
    grads = {p.peer_id: torch.randn(32, generator=gen) for p in (me, honest)}
    grads[flipper.peer_id] = -1000.0 * torch.randn(32, generator=gen)
    center = centered_clip(list(grads.values()), [1.0] * 3, tau=5.0, iterations=20)
    checker.inspect(0, 1, [_Part(start=0, end=32, values=grads, center=center)])
    assert checker.offenders() == frozenset({flipper.peer_id})


def test_replay_is_caught_when_the_span_bounds_move(identities, memory_store):
    """The group changed between two steps, so this node reduces a different slice: the replayer's stale flat
    gradient is still caught through the blocks at aligned offsets both slices contain."""
    me, honest, replayer = identities[:3]
    checker = GradientChecker(
        me,
        GradientCheckConfig(run_id="run", window_steps=5, outliers=OutlierConfig(), replay_block_numel=1024),
        memory_store,
    )
    gen = torch.Generator().manual_seed(11)
    stale = torch.randn(20_000, generator=gen)  # the replayer's whole flat gradient, re-sent every step
    for step, (start, end) in enumerate([(0, 6000), (2500, 9000)]):
        values = {
            me.peer_id: torch.randn(end - start, generator=gen),
            honest.peer_id: torch.randn(end - start, generator=gen),
            replayer.peer_id: stale[start:end],
        }
        new = checker.inspect(step, 0, [_Part(start=start, end=end, values=values, center=values[me.peer_id])])
        assert [(PeerID(e.peer), e.reason) for e in new] == ([] if step == 0 else [(replayer.peer_id, "replayed")])
