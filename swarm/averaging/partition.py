"""Flatten tensors, split the flat vector into one span per group member, and cut spans into parts.

A member's span is the slice of the flat vector it reduces for the whole group ("owner"). Spans are equal by
default, proportional to each member's announced bandwidth when every member announced one, and empty for a
client-mode member (it sends and receives but reduces nothing). A span is cut into parts of about
``part_size_bytes`` that travel as independent chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarm.errors import ConfigError, SwarmError

FLAT_DTYPE = torch.float32
FLAT_ITEM_BYTES = 4


def flatten_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 copy of all ``tensors`` (floating point only), in order."""
    for i, t in enumerate(tensors):
        if not torch.is_floating_point(t):
            raise SwarmError(f"tensor {i} has dtype {t.dtype}; only floating-point tensors can be averaged")
    total = sum(t.numel() for t in tensors)
    flat = torch.empty(total, dtype=FLAT_DTYPE)
    offset = 0
    for t in tensors:
        n = t.numel()
        flat[offset : offset + n].copy_(t.detach().reshape(-1))
        offset += n
    return flat


def flat_view_or_copy(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-D view of a single contiguous float32 CPU tensor (no copy: results land in it directly), else a
    flat copy of all of them (see :func:`flatten_tensors`)."""
    if len(tensors) == 1:
        t = tensors[0]
        if t.dtype == FLAT_DTYPE and t.device.type == "cpu" and t.is_contiguous():
            return t.detach().view(-1)
    return flatten_tensors(tensors)


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` back into ``tensors`` in place (each keeps its own dtype and shape); a no-op for a view."""
    total = sum(t.numel() for t in tensors)
    if flat.numel() != total:
        raise SwarmError(f"flat vector has {flat.numel()} elements but the tensors hold {total}")
    if len(tensors) == 1 and tensors[0].numel() > 0 and tensors[0].data_ptr() == flat.data_ptr():
        return
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n


def span_sizes(total_numel: int, bandwidths: Sequence[float | None], client_mode: Sequence[bool]) -> list[int]:
    """How many elements each member owns; the sizes sum to ``total_numel``.

    Equal split among non-client members, or proportional to bandwidth when every non-client member announced
    a positive one. Rounding uses the largest remainder, ties to the earlier member, so every member computes
    the same split from the same ordered membership.
    """
    if len(bandwidths) != len(client_mode) or not bandwidths:
        raise ConfigError("bandwidths and client_mode must be non-empty and of equal length")
    if total_numel < 0:
        raise ConfigError(f"total_numel must be >= 0, got {total_numel}")
    owners = [i for i, client in enumerate(client_mode) if not client]
    if not owners:
        return [0] * len(bandwidths)
    given = [bandwidths[i] for i in owners]
    positive = [float(b) for b in given if b is not None and b > 0 and math.isfinite(b)]
    shares = positive if len(positive) == len(given) else [1.0] * len(owners)
    total_share = sum(shares)
    exact = [total_numel * s / total_share for s in shares]
    sizes = [math.floor(x) for x in exact]
    leftover = total_numel - sum(sizes)
    order = sorted(range(len(owners)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in order[:leftover]:
        sizes[k] += 1
    result = [0] * len(bandwidths)
    for k, i in enumerate(owners):
        result[i] = sizes[k]
    return result


def span_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of consecutive spans with the given sizes."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def part_numel(part_size_bytes: int) -> int:
    """Elements of the flat vector in one part of ``part_size_bytes``."""
    return max(1, part_size_bytes // FLAT_ITEM_BYTES)


def part_bounds(span_numel: int, numel_per_part: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` offsets within a span of its parts; the last may be shorter."""
    if numel_per_part <= 0:
        raise ConfigError(f"numel_per_part must be > 0, got {numel_per_part}")
    return [(s, min(s + numel_per_part, span_numel)) for s in range(0, span_numel, numel_per_part)]
