"""The owner's reduction: streaming weighted mean per part, dropped senders, CenteredClip and its bound."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.averaging.partition import part_bounds
from swarm.averaging.reducer import ReductionConfig, SpanReducer, centered_clip
from swarm.errors import ConfigError, SwarmError


async def test_weighted_mean_per_part_in_any_arrival_order() -> None:
    gen = torch.Generator().manual_seed(1)
    parts = part_bounds(10, 4)
    xs = [torch.randn(10, generator=gen) for _ in range(3)]
    ws = [1.0, 2.5, 7.0]
    reducer = SpanReducer(span_numel=10, parts=parts, senders=range(3), config=ReductionConfig())
    order = [(2, 1), (0, 0), (1, 2), (2, 0), (0, 2), (1, 0), (0, 1), (2, 2), (1, 1)]
    for sender, index in order:
        s, e = parts[index]
        reducer.add(sender, index, xs[sender][s:e], ws[sender])
        await reducer.finish_ready()
    assert reducer.all_done
    expected = sum(w * x.double() for w, x in zip(ws, xs, strict=False)) / sum(ws)
    got = torch.cat([await reducer.wait_part(i) for i in range(len(parts))])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


async def test_failed_sender_is_left_out_of_parts_it_did_not_deliver() -> None:
    parts = part_bounds(4, 2)
    reducer = SpanReducer(span_numel=4, parts=parts, senders=[0, 1, 2], config=ReductionConfig())
    for sender in (0, 1, 2):
        reducer.add(sender, 0, torch.full((2,), float(sender)), 1.0)
    reducer.add(0, 1, torch.full((2,), 0.0), 1.0)
    reducer.add(1, 1, torch.full((2,), 3.0), 3.0)
    await reducer.finish_ready()
    assert reducer.has_result(0) and not reducer.is_complete(1)
    reducer.fail(2)
    await reducer.finish_ready()
    assert reducer.all_done
    assert (await reducer.wait_part(0)).tolist() == [1.0, 1.0]
    assert (await reducer.wait_part(1)).tolist() == [2.25, 2.25]  # (0*1 + 3*3) / 4
    assert reducer.delivered_by(1) == {0, 1}


def test_add_rejects_unexpected_duplicate_misshaped_and_bad_weight() -> None:
    reducer = SpanReducer(span_numel=4, parts=part_bounds(4, 2), senders=[0, 1], config=ReductionConfig())
    reducer.add(0, 0, torch.zeros(2), 1.0)
    with pytest.raises(SwarmError, match="twice"):
        reducer.add(0, 0, torch.zeros(2), 1.0)
    with pytest.raises(SwarmError, match="not expected"):
        reducer.add(5, 0, torch.zeros(2), 1.0)
    with pytest.raises(SwarmError, match="should have"):
        reducer.add(1, 0, torch.zeros(3), 1.0)
    with pytest.raises(SwarmError, match="out of range"):
        reducer.add(1, 9, torch.zeros(2), 1.0)
    with pytest.raises(SwarmError, match="weight"):
        reducer.add(1, 0, torch.zeros(2), math.nan)
    reducer.fail(1)
    with pytest.raises(SwarmError, match="not expected"):
        reducer.add(1, 1, torch.zeros(2), 1.0)


def test_reduction_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="reduction"):
        ReductionConfig(reduction="median")
    with pytest.raises(ConfigError, match="clip_tau"):
        ReductionConfig(clip_tau=0.0)
    with pytest.raises(ConfigError, match="clip_iterations"):
        ReductionConfig(clip_iterations=0)


def _attacked(num_honest: int, num_byzantine: int, numel: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(numel, generator=gen, dtype=torch.float64)
    honest = [mu + 0.1 * torch.randn(numel, generator=gen, dtype=torch.float64) for _ in range(num_honest)]
    byzantine = [-1000.0 * honest[i] for i in range(num_byzantine)]  # sign-flipped, scaled gradients
    return honest + byzantine, torch.stack(honest).mean(0)


def test_centered_clip_stays_within_the_analytic_bound_while_the_mean_does_not() -> None:
    """Bound: at CenteredClip's fixed point v, if every honest x_i is within tau of v, then
    sum_H w_i (x_i - v) = -sum_B w_i clip(x_i - v), so |v - mu_H| <= tau * W_B / W_H (here 2/6 of tau)."""
    values, honest_mean = _attacked(6, 2, 2000, seed=7)
    weights = [1.0] * 8
    spread = max(float((v - honest_mean).norm()) for v in values[:6])
    tau = 2.0 * spread
    bound = tau * 2.0 / 6.0
    v = centered_clip(values, weights, tau=tau, iterations=50)
    assert all(float((x - v).norm()) <= tau for x in values[:6])  # the bound's precondition holds
    assert float((v - honest_mean).norm()) <= bound
    plain = torch.stack(values).mean(0)
    assert float((plain - honest_mean).norm()) > 100 * bound


async def test_reducer_with_centered_clip_bounds_each_part() -> None:
    values, honest_mean = _attacked(6, 2, 600, seed=3)
    parts = part_bounds(600, 256)
    spread = max(float((v[s:e] - honest_mean[s:e]).norm()) for v in values[:6] for s, e in parts)
    tau = 2.0 * spread
    config = ReductionConfig(reduction="centered_clip", clip_tau=tau, clip_iterations=50)
    reducer = SpanReducer(span_numel=600, parts=parts, senders=range(8), config=config)
    for sender, x in enumerate(values):
        for index, (s, e) in enumerate(parts):
            reducer.add(sender, index, x[s:e].float(), 1.0)
    await reducer.finish_ready()
    for index, (s, e) in enumerate(parts):
        got = await reducer.wait_part(index)
        assert float((got - honest_mean[s:e]).norm()) <= tau * 2.0 / 6.0 + 1e-4
