"""The owner's side of butterfly all-reduce: reduce the parts of one span from all senders as they arrive.

Each part (about 512 KiB of the span) is reduced on its own. With ``mean`` a part is accumulated in float32 as
chunks arrive (``acc += w * x``, nothing per sender is kept), as gloo and NCCL do: a float64 accumulator costs a
conversion pass per sender (10x the time of the float32 add) for an error far below any codec's. With
``centered_clip`` the part's values from each sender are held until the part is complete, then CenteredClip runs
(in float64) on that part only. A part is complete when every expected sender has delivered it or has been
declared failed; its result is the weighted mean (or the clipped center) over the senders that delivered it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence

import torch

from swarm.configs import Config, setting
from swarm.errors import SwarmError

REDUCTIONS = ("mean", "centered_clip")


class ReductionConfig(Config, section="reduction"):
    """How an owner reduces a part: plain weighted ``mean``, or ``centered_clip`` with ``tau`` and iterations.

    ``inspect_parts`` (gradient checks): keep each sender's values of the first N parts; senders weighing less than
    one sample (a peer that served nothing this step) are left out, their zero gradients prove nothing.
    """

    reduction: str = setting(default="mean", choices=REDUCTIONS, doc="mean or centered_clip.")
    clip_tau: float = setting(default=1.0, gt=0, lt=math.inf, doc="centered_clip: clipping radius.")
    clip_iterations: int = setting(default=20, ge=1, le=10_000, doc="centered_clip: fixed-point iterations.")
    inspect_parts: int = setting(default=0, ge=0, le=64, doc="Keep every sender's values of the first N parts.")


def centered_clip(
    values: Sequence[torch.Tensor], weights: Sequence[float], *, tau: float, iterations: int
) -> torch.Tensor:
    """Weighted CenteredClip (Karimireddy et al., 2021) of equally shaped vectors, in float64.

    Starts at the coordinate-wise median and iterates ``v += sum_i w_i (x_i - v) min(1, tau/|x_i - v|) / sum_i w_i``.
    At its fixed point, if every honest x_i lies within ``tau`` of v, then
    ``|v - honest_weighted_mean| <= tau * W_byzantine / W_honest``.
    """
    if not values or len(values) != len(weights):
        raise SwarmError("centered_clip needs one weight per value and at least one value")
    x = torch.stack([v.to(torch.float64).reshape(-1) for v in values])
    w = torch.tensor([float(a) for a in weights], dtype=torch.float64)
    total = w.sum()
    if not total > 0:
        raise SwarmError("centered_clip needs a positive total weight")
    center = x.median(dim=0).values if len(values) > 2 else (w[:, None] * x).sum(0) / total
    for _ in range(iterations):
        diff = x - center
        norms = diff.norm(dim=1)
        scale = torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)
        center = center + (w * scale) @ diff / total
    return center


class SpanReducer:
    """Accumulates one span from a known set of senders; each part completes independently.

    The async side calls :meth:`add` (and :meth:`fail` for a sender that is gone) from the event loop, then
    awaits :meth:`wait_part` to read a part's result; :meth:`finish_ready` reduces complete parts (CenteredClip in
    a worker thread).
    """

    def __init__(
        self,
        *,
        span_numel: int,
        parts: Sequence[tuple[int, int]],
        senders: Iterable[int],
        config: ReductionConfig,
    ) -> None:
        self.span_numel = span_numel
        self.parts = list(parts)
        self.config = config
        self.expected = set(senders)
        self.failed: set[int] = set()
        self._delivered: list[set[int]] = [set() for _ in self.parts]
        self._weight = [0.0] * len(self.parts)
        # per part: a float32 accumulator while it is open, its result once reduced (allocated lazily)
        self._acc: list[torch.Tensor | None] = [None] * len(self.parts)
        self._held: list[list[tuple[float, torch.Tensor]]] = [[] for _ in self.parts]
        self._done = [asyncio.Event() for _ in self.parts]
        self._claimed = [False] * len(self.parts)
        # gradient checks: each sender's values of the first ``inspect_parts`` parts, and their reduced center
        self._samples: dict[int, dict[int, torch.Tensor]] = {}
        self.inspected: dict[int, tuple[dict[int, torch.Tensor], torch.Tensor]] = {}

    def add(self, sender: int, part_index: int, values: torch.Tensor, weight: float) -> None:
        """Take ``sender``'s values for one part; SwarmError if it is unexpected, duplicate or misshaped."""
        if sender not in self.expected or sender in self.failed:
            raise SwarmError(f"sender {sender} is not expected (or was dropped) in this round")
        if not 0 <= part_index < len(self.parts):
            raise SwarmError(f"part {part_index} out of range (span has {len(self.parts)} parts)")
        if sender in self._delivered[part_index]:
            raise SwarmError(f"sender {sender} sent part {part_index} twice")
        start, end = self.parts[part_index]
        if values.numel() != end - start:
            raise SwarmError(f"part {part_index} should have {end - start} values, got {values.numel()}")
        if not (weight > 0 and math.isfinite(weight)):
            raise SwarmError(f"sender weight must be finite and > 0, got {weight}")
        flat = values.reshape(-1)
        if self.config.reduction == "mean":
            acc = self._acc[part_index]
            if acc is None:  # the first sender's weighted values start the sum (no zero fill)
                self._acc[part_index] = torch.mul(flat, weight, out=torch.empty(end - start, dtype=torch.float32))
            else:
                acc.add_(flat, alpha=weight)
            if part_index < self.config.inspect_parts and weight >= 1.0:
                self._samples.setdefault(part_index, {})[sender] = flat.clone()
        else:
            self._held[part_index].append((weight, flat.clone()))
            if part_index < self.config.inspect_parts and weight >= 1.0:
                self._samples.setdefault(part_index, {})[sender] = self._held[part_index][-1][1]
        self._weight[part_index] += weight
        self._delivered[part_index].add(sender)

    def fail(self, sender: int) -> None:
        """Drop ``sender``: parts it has not delivered yet complete without it."""
        if sender in self.expected:
            self.failed.add(sender)

    def is_complete(self, part_index: int) -> bool:
        return (self.expected - self.failed) <= self._delivered[part_index]

    def ready_parts(self) -> list[int]:
        """Parts that are complete and not yet reduced (each is returned once)."""
        ready = []
        for i in range(len(self.parts)):
            if not self._claimed[i] and self.is_complete(i):
                self._claimed[i] = True
                ready.append(i)
        return ready

    async def finish_ready(self) -> None:
        """Reduce every newly complete part and wake its readers."""
        for i in self.ready_parts():
            if self._weight[i] > 0:
                if self.config.reduction == "mean":
                    acc = self._acc[i]
                    if acc is None:
                        raise SwarmError(f"internal: part {i} has weight but no accumulator")
                    acc.div_(self._weight[i])
                    reduced = acc
                else:
                    held, self._held[i] = self._held[i], []
                    result = await asyncio.to_thread(
                        centered_clip,
                        [v for _, v in held],
                        [w for w, _ in held],
                        tau=self.config.clip_tau,
                        iterations=self.config.clip_iterations,
                    )
                    reduced = result.to(torch.float32)
                    self._acc[i] = reduced
                samples = self._samples.pop(i, None)
                if samples:
                    self.inspected[i] = (samples, reduced)
            self._done[i].set()

    def has_result(self, part_index: int) -> bool:
        """True once the part is reduced and some sender delivered it."""
        return self._done[part_index].is_set() and self._weight[part_index] > 0

    async def wait_part(self, part_index: int) -> torch.Tensor | None:
        """The reduced part (float32), or None if no sender delivered it. No deadline: wrap in one."""
        await self._done[part_index].wait()
        if self._weight[part_index] <= 0:
            return None
        return self._acc[part_index]

    @property
    def all_done(self) -> bool:
        return all(e.is_set() for e in self._done)

    def delivered_by(self, part_index: int) -> frozenset[int]:
        return frozenset(self._delivered[part_index])
