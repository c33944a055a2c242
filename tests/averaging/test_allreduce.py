"""Butterfly all-reduce over real loopback transports with fixed groups (matchmaking is tested separately)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from swarm.p2p import Transport
from swarm.averaging.allreduce import AllReduceOutcome, AllReduceServer, Group, run_allreduce
from swarm.averaging.config import AveragerConfig
from swarm.averaging.partition import flatten_tensors, part_bounds, part_numel
from swarm.averaging.wire import CompressionPartCodec, PartCodec
from tests.averaging.conftest import fixed_groups, random_tensors, transports, weighted_mean

SHAPES = [(37, 11), (1001,), (3,)]  # 1411 values: not divisible by 2..8


def _config(**kw: object) -> AveragerConfig:
    base: dict[str, object] = {
        "part_size_bytes": 4096,
        "allreduce_timeout_s": 20.0,
        "part_timeout_s": 3.0,
        "join_timeout_s": 3.0,
    }
    base.update(kw)
    return AveragerConfig(**base)  # type: ignore[arg-type]


def _servers(ts: Sequence[Transport], cfg: AveragerConfig, codec: PartCodec) -> list[AllReduceServer]:
    servers = [AllReduceServer(cfg, t, codec) for t in ts]
    for s in servers:
        s.register()
    return servers


async def _run(
    servers: Sequence[AllReduceServer], groups: Sequence[Group], flats: Sequence[torch.Tensor], weights: Sequence[float]
) -> list[AllReduceOutcome]:
    for s, g in zip(servers, groups, strict=False):
        s.expect(g.group_key, g.round_id)
    async with asyncio.timeout(60):
        return list(
            await asyncio.gather(
                *(run_allreduce(s, g, f, w) for s, g, f, w in zip(servers, groups, flats, weights, strict=False))
            )
        )


@pytest.mark.parametrize("num_peers", [2, 3, 5, 8])
async def test_exact_weighted_mean(num_peers: int) -> None:
    gen = torch.Generator().manual_seed(num_peers)
    weights = (torch.rand(num_peers, generator=gen) * 10 + 0.1).tolist()
    flats = [flatten_tensors(random_tensors(100 + i, SHAPES)) for i in range(num_peers)]
    expected = weighted_mean(flats, weights)
    async with transports(num_peers) as ts:
        servers = _servers(ts, _config(), CompressionPartCodec("none"))
        outcomes = await _run(servers, fixed_groups(ts, "run/avg/0/1"), flats, weights)
    for flat, outcome in zip(flats, outcomes, strict=False):
        assert outcome.lost_owners == () and outcome.dropped_senders == ()
        torch.testing.assert_close(flat.double(), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(flats[0], f) for f in flats[1:])


@pytest.mark.parametrize(("codec", "tolerance"), [("fp16", 2e-3), ("blockwise8", 5e-2)])
async def test_lossy_codecs_stay_within_their_error_bound(codec: str, tolerance: float) -> None:
    """fp16 keeps ~3 significant digits (values here are |x| < 5); blockwise8 quantizes to 1/127 of each
    block's absolute maximum (< 5 here), so a sender's error is at most ~0.02 per value, twice on the way."""
    weights = [1.0, 2.0, 3.0, 4.0]
    flats = [flatten_tensors(random_tensors(200 + i, SHAPES)) for i in range(4)]
    expected = weighted_mean(flats, weights)
    async with transports(4) as ts:
        servers = _servers(ts, _config(codec=codec), CompressionPartCodec(codec))
        await _run(servers, fixed_groups(ts, "run/avg/0/2"), flats, weights)
    for flat in flats:
        err = (flat.double() - expected).abs().max().item()
        assert err <= tolerance, f"{codec}: max error {err}"


async def test_bandwidth_proportional_spans_and_client_mode() -> None:
    weights = [1.0, 1.0, 2.0]
    flats = [flatten_tensors(random_tensors(300 + i, SHAPES)) for i in range(3)]
    expected = weighted_mean(flats, weights)
    async with transports(3) as ts:
        servers = _servers(ts, _config(), CompressionPartCodec("none"))
        groups = fixed_groups(ts, "k", bandwidths=[10.0, 30.0, 5.0], client_mode=[False, False, True])
        assert [e - s for s, e in groups[0].spans(flats[0].numel())] == [353, 1058, 0]
        await _run(servers, groups, flats, weights)
    for flat in flats:
        torch.testing.assert_close(flat.double(), expected, rtol=1e-6, atol=1e-6)


async def test_member_that_dies_before_sending_is_dropped_and_others_finish() -> None:
    """Peer 2 of 4 agreed to the group and then died: the survivors hold the survivors' weighted mean, and
    each keeps its own values for the span peer 2 owned. Nothing is NaN; everyone returns before the deadline."""
    weights = [1.0, 2.0, 3.0, 4.0]
    flats = [flatten_tensors(random_tensors(400 + i, SHAPES)) for i in range(4)]
    own = [f.clone() for f in flats]
    alive = [0, 1, 3]
    expected = weighted_mean([flats[i] for i in alive], [weights[i] for i in alive])
    cfg = _config(part_timeout_s=1.0, allreduce_timeout_s=10.0)
    async with transports(4) as ts:
        servers = _servers(ts, cfg, CompressionPartCodec("none"))
        groups = fixed_groups(ts, "k")
        await ts[2].stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcomes = await _run(
            [servers[i] for i in alive],
            [groups[i] for i in alive],
            [flats[i] for i in alive],
            [weights[i] for i in alive],
        )
        assert loop.time() - started < cfg.allreduce_timeout_s
    lost_start, lost_end = groups[0].spans(flats[0].numel())[2]
    for i, outcome in zip(alive, outcomes, strict=False):
        assert ts[2].peer_id in outcome.lost_owners and ts[2].peer_id in outcome.dropped_senders
        flat = flats[i]
        assert torch.isfinite(flat).all()
        torch.testing.assert_close(flat[lost_start:lost_end], own[i][lost_start:lost_end], rtol=0, atol=0)
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        mask[lost_start:lost_end] = False
        torch.testing.assert_close(flat.double()[mask], expected[mask], rtol=1e-6, atol=1e-6)


class _GarbageCodec:
    """Encodes parts as bytes no decoder accepts (a peer that sends garbage)."""

    name = "garbage"
    inline = True

    def __init__(self, inner: PartCodec) -> None:
        self.inner = inner

    def encode(self, values: torch.Tensor) -> tuple[bytes, ...]:
        return (b"\xff" * 64,)

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        return self.inner.decode(data, numel)

    def decode_into(self, data: bytes, out: torch.Tensor) -> None:
        self.inner.decode_into(data, out)


async def test_sender_of_garbage_is_dropped_and_the_rest_average() -> None:
    weights = [1.0, 1.0, 1.0]
    flats = [flatten_tensors(random_tensors(500 + i, SHAPES)) for i in range(3)]
    expected_honest = weighted_mean(flats[:2], weights[:2])
    async with transports(3) as ts:
        good = CompressionPartCodec("none")
        cfg = _config()
        servers = _servers(ts[:2], cfg, good) + _servers(ts[2:], cfg, _GarbageCodec(good))
        groups = fixed_groups(ts, "k")
        outcomes = await _run(servers, groups, flats, weights)
        spans = groups[0].spans(flats[0].numel())
    for i in (0, 1):
        assert ts[2].peer_id in outcomes[i].dropped_senders
        s, e = spans[i]
        torch.testing.assert_close(flats[i].double()[s:e], expected_honest[s:e], rtol=1e-6, atol=1e-6)
        assert torch.isfinite(flats[i]).all()


async def test_parts_for_an_unknown_round_are_refused() -> None:
    flats = [flatten_tensors(random_tensors(600 + i, SHAPES)) for i in range(2)]
    own = [f.clone() for f in flats]
    async with transports(2) as ts:
        servers = _servers(
            ts, _config(join_timeout_s=0.5, part_timeout_s=0.5, allreduce_timeout_s=5.0), CompressionPartCodec("none")
        )
        groups_a = fixed_groups(ts, "run/avg/0/1")
        groups_b = fixed_groups(ts, "run/avg/0/2")  # peer 1 runs another epoch's round: nothing may mix
        servers[0].expect(groups_a[0].group_key, groups_a[0].round_id)
        servers[1].expect(groups_b[1].group_key, groups_b[1].round_id)
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(
                run_allreduce(servers[0], groups_a[0], flats[0], 1.0),
                run_allreduce(servers[1], groups_b[1], flats[1], 1.0),
            )
    for i, outcome in enumerate(outcomes):
        assert outcome.lost_owners and outcome.dropped_senders
        assert torch.equal(flats[i], own[i])


class _StallingCodec:
    """Encodes ``parts_before_stall`` parts normally, then blocks its worker thread: a peer that stalls."""

    name = "stalling"
    inline = False

    def __init__(self, inner: PartCodec, parts_before_stall: int, release: threading.Event) -> None:
        self.inner = inner
        self.remaining = parts_before_stall
        self.release = release
        self.stalled = threading.Event()
        self.lock = threading.Lock()

    def encode(self, values: torch.Tensor) -> tuple[Any, ...]:
        with self.lock:
            self.remaining -= 1
            stall = self.remaining < 0
        if stall:
            self.stalled.set()
            self.release.wait(timeout=30)
        return self.inner.encode(values)

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        return self.inner.decode(data, numel)

    def decode_into(self, data: bytes, out: torch.Tensor) -> None:
        self.inner.decode_into(data, out)


@pytest.mark.parametrize("killed", [False, True])
async def test_member_that_stalls_or_dies_mid_round_is_dropped(killed: bool) -> None:
    """Peer 3 encodes 2 parts, then stalls (sending and serving). Stalled: the others drop it after
    part_timeout_s. Killed while stalled: they drop it as soon as its connections close, well before
    part_timeout_s. Either way, each part the survivors hold is the mean of all four (a part peer 3 delivered),
    of the three survivors, or their own values (a part they never got back); nothing is NaN."""
    weights = [1.0, 2.0, 3.0, 4.0]
    flats = [flatten_tensors(random_tensors(700 + i, SHAPES)) for i in range(4)]
    own = [f.clone() for f in flats]
    mean_all = weighted_mean(flats, weights)
    mean_alive = weighted_mean(flats[:3], weights[:3])
    cfg = _config(part_timeout_s=8.0 if killed else 1.0, allreduce_timeout_s=20.0)
    release = threading.Event()
    good = CompressionPartCodec("none")
    stalling = _StallingCodec(good, 2, release)
    try:
        async with transports(4) as ts:
            servers = _servers(ts[:3], cfg, good) + _servers(ts[3:], cfg, stalling)
            groups = fixed_groups(ts, "k")
            for s, g in zip(servers, groups, strict=False):
                s.expect(g.group_key, g.round_id)
            victim = asyncio.ensure_future(run_allreduce(servers[3], groups[3], flats[3], weights[3]))
            loop = asyncio.get_running_loop()
            started = loop.time()
            survivors = asyncio.gather(*(run_allreduce(servers[i], groups[i], flats[i], weights[i]) for i in range(3)))
            async with asyncio.timeout(30):
                if killed:
                    assert await asyncio.to_thread(stalling.stalled.wait, 10)
                    await ts[3].stop()
                outcomes = await survivors
            elapsed = loop.time() - started
            assert elapsed < (cfg.part_timeout_s if killed else cfg.allreduce_timeout_s)
            await ts[3].stop()
            victim.cancel()
            await asyncio.gather(victim, return_exceptions=True)
    finally:
        release.set()
    spans = groups[0].spans(flats[0].numel())
    assert any(ts[3].peer_id in o.dropped_senders for o in outcomes)  # its third part never came
    for i in range(3):
        assert ts[3].peer_id in outcomes[i].lost_owners  # it stopped serving its span's results
        flat = flats[i].double()
        assert torch.isfinite(flat).all()
        for s0, e0 in spans:
            for s, e in part_bounds(e0 - s0, part_numel(cfg.part_size_bytes)):
                part = slice(s0 + s, s0 + e)
                options = (mean_all[part], mean_alive[part], own[i][part].double())
                assert any(torch.allclose(flat[part], o, rtol=1e-6, atol=1e-6) for o in options)


async def test_centered_clip_end_to_end_bounds_two_attackers_of_eight() -> None:
    """8 peers, 2 send their gradient x(-1000). With CenteredClip every part of the result stays within
    tau * W_byzantine / W_honest = tau / 3 of the honest mean (the bound is derived in test_reducer); the
    attackers push all in one direction, so the bound is nearly tight: 0.1% slack for float32 rounding."""
    gen = torch.Generator().manual_seed(11)
    mu = torch.randn(1411, generator=gen)
    honest = [mu + 0.1 * torch.randn(1411, generator=gen) for _ in range(6)]
    flats = [h.clone() for h in honest] + [-1000.0 * honest[0], -1000.0 * honest[1]]
    sent = [f.double().clone() for f in flats]
    honest_mean = torch.stack([h.double() for h in honest]).mean(0)
    async with transports(8, salt=5) as ts:
        groups = fixed_groups(ts, "k")
        parts = [
            slice(s0 + s, s0 + e) for s0, e0 in groups[0].spans(1411) for s, e in part_bounds(e0 - s0, part_numel(4096))
        ]
        tau = 2.0 * max(float((h.double()[p] - honest_mean[p]).norm()) for h in honest for p in parts)
        cfg = _config(reduction="centered_clip", clip_tau=tau, clip_iterations=50)
        await _run(_servers(ts, cfg, CompressionPartCodec("none")), groups, flats, [1.0] * 8)
    bound = tau * 2.0 / 6.0
    plain = torch.stack(sent).mean(0)
    for p in parts:
        for flat in flats[:6]:
            assert float((flat.double()[p] - honest_mean[p]).norm()) <= bound * 1.001
        assert float((plain[p] - honest_mean[p]).norm()) > 100 * bound


@pytest.mark.parametrize("reduction", ["mean", "centered_clip"])
async def test_inspect_parts_returns_every_members_values_and_the_center(reduction: str) -> None:
    """With ``inspect_parts=1`` each owner returns what every member sent for the first part of its span and the
    reduced center of that part; members that served nothing (weight < 1) are left out."""
    num_peers = 3
    weights = [2.0, 3.0, 0.001]
    flats = [flatten_tensors(random_tensors(200 + i, SHAPES)) for i in range(num_peers)]
    originals = [f.clone() for f in flats]
    async with transports(num_peers) as ts:
        cfg = _config(inspect_parts=1, reduction=reduction, clip_tau=100.0)
        servers = _servers(ts, cfg, CompressionPartCodec("none"))
        groups = fixed_groups(ts, "run/avg/0/2")
        outcomes = await _run(servers, groups, flats, weights)
    for me, (outcome, group) in enumerate(zip(outcomes, groups, strict=False)):
        start, end = group.spans(originals[0].numel())[me]
        assert len(outcome.inspected) == 1
        part = outcome.inspected[0]
        assert part.start == start and part.end == start + min(end - start, part_numel(cfg.part_size_bytes))
        assert sorted(part.values) == sorted(group.peer(i) for i in range(2))  # the weight-0.001 member is left out
        for i in range(2):
            assert torch.equal(part.values[group.peer(i)], originals[i][part.start : part.end])
        torch.testing.assert_close(part.center, flats[me][part.start : part.end])


async def test_inspect_parts_off_keeps_nothing() -> None:
    flats = [flatten_tensors(random_tensors(300 + i, SHAPES)) for i in range(2)]
    async with transports(2) as ts:
        servers = _servers(ts, _config(), CompressionPartCodec("none"))
        outcomes = await _run(servers, fixed_groups(ts, "run/avg/0/3"), flats, [1.0, 1.0])
    assert all(o.inspected == () for o in outcomes)


async def test_excluded_member_is_left_out_of_this_owners_span_and_its_span_keeps_local_values() -> None:
    """Peer 0 excludes peer 2 (its gradient checks caught it): peer 0's span is the mean of peers 0 and 1 only,
    peer 0 keeps its own values for peer 2's span, and the round still counts as averaged with others. Peer 0
    tells peer 2 at once that no parts will come: with a 60 s part timeout, the round still ends within the
    test's 20 s deadline (before, every member waited out the excluded owner's part timeout)."""
    flats = [flatten_tensors(random_tensors(400 + i, SHAPES)) for i in range(3)]
    originals = [f.clone() for f in flats]
    async with transports(3) as ts:
        cfg = _config(part_timeout_s=60.0, allreduce_timeout_s=120.0)
        servers = _servers(ts, cfg, CompressionPartCodec("none"))
        groups = fixed_groups(ts, "run/avg/0/4")
        for s, g in zip(servers, groups, strict=False):
            s.expect(g.group_key, g.round_id)
        async with asyncio.timeout(20):
            outcomes = await asyncio.gather(
                run_allreduce(servers[0], groups[0], flats[0], 1.0, exclude={ts[2].peer_id}),
                run_allreduce(servers[1], groups[1], flats[1], 1.0),
                run_allreduce(servers[2], groups[2], flats[2], 1.0),
            )
    spans = groups[0].spans(originals[0].numel())
    (a0, b0), (a1, b1), (a2, b2) = spans
    honest_mean = weighted_mean(originals[:2], [1.0, 1.0])
    torch.testing.assert_close(flats[0][a0:b0].double(), honest_mean[a0:b0])
    torch.testing.assert_close(flats[0][a2:b2], originals[0][a2:b2])  # the excluded owner's span: own values
    full_mean = weighted_mean(originals, [1.0, 1.0, 1.0])
    torch.testing.assert_close(flats[0][a1:b1].double(), full_mean[a1:b1])  # peer 1 still reduces all three
    assert outcomes[0].excluded == (ts[2].peer_id,)
    assert outcomes[0].lost_owners == () and outcomes[0].dropped_senders == ()
    assert ts[0].peer_id in outcomes[2].dropped_senders  # peer 0 sent nothing to the excluded member's span
