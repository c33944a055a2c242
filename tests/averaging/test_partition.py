"""Partition: flattening round-trips, span splits (equal, proportional, client mode), part cuts."""

from __future__ import annotations

import pytest
import torch

from swarm.averaging.partition import (
    flat_view_or_copy,
    flatten_tensors,
    part_bounds,
    part_numel,
    span_bounds,
    span_sizes,
    unflatten_into,
)
from swarm.errors import ConfigError, SwarmError
import itertools


def test_flatten_round_trip_keeps_shapes_and_dtypes() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 5, generator=gen),
        torch.randn(7, generator=gen).double(),
        torch.randn(2, 2, 2, generator=gen),
    ]
    flat = flatten_tensors(tensors)
    assert flat.dtype == torch.float32 and flat.numel() == 15 + 7 + 8
    out = [torch.zeros_like(t) for t in tensors]
    unflatten_into(flat, out)
    for a, b in zip(tensors, out, strict=False):
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a.to(b.dtype), rtol=1e-6, atol=1e-6)


def test_a_single_float32_tensor_is_averaged_without_a_copy() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    flat = flat_view_or_copy([t])
    flat[0] = 42.0
    assert t[0, 0] == 42.0
    unflatten_into(flat, [t])
    assert t.flatten().tolist() == [42.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    other = torch.zeros(3, dtype=torch.float64)
    assert flat_view_or_copy([other]).data_ptr() != other.data_ptr()
    assert flat_view_or_copy([t.t()]).data_ptr() != t.data_ptr()  # not contiguous: copied


def test_flatten_rejects_integer_tensors_and_wrong_sizes() -> None:
    with pytest.raises(SwarmError, match="floating-point"):
        flatten_tensors([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(SwarmError, match="elements"):
        unflatten_into(torch.zeros(4), [torch.zeros(5)])


@pytest.mark.parametrize("total", [0, 1, 7, 1000, 1001])
@pytest.mark.parametrize("members", [1, 2, 3, 8])
def test_equal_spans_cover_everything(total: int, members: int) -> None:
    sizes = span_sizes(total, [None] * members, [False] * members)
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    bounds = span_bounds(sizes)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_spans_proportional_to_bandwidth_and_client_gets_none() -> None:
    sizes = span_sizes(1000, [100.0, 300.0, 50.0], [False, False, True])
    assert sizes == [250, 750, 0]
    # one member without an announced bandwidth: equal split among owners
    assert span_sizes(10, [100.0, None, 5.0], [False, False, False]) == [4, 3, 3]
    assert span_sizes(10, [None, None], [True, True]) == [0, 0]


def test_span_sizes_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        span_sizes(10, [None], [False, True])
    with pytest.raises(ConfigError):
        span_sizes(-1, [None], [False])


def test_parts_are_about_512_kib() -> None:
    n = part_numel(512 * 1024)
    assert n == 131072
    bounds = part_bounds(3 * n + 5, n)
    assert [e - s for s, e in bounds] == [n, n, n, 5]
    assert part_bounds(0, n) == []
    with pytest.raises(ConfigError):
        part_bounds(5, 0)
