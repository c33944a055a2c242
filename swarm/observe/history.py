"""What the endpoints remember between reads: when the step last moved (`StepClock`) and the loss curves
(`Curves`), both bounded."""

from __future__ import annotations

from collections import deque


class StepClock:
    """The step as observed over time: when it last advanced, and the recent rate (steps per second)."""

    def __init__(self, started: float, *, max_points: int = 64) -> None:
        self.step: int | None = None
        self.changed_at = started  # monotonic; the start counts as a change, so a node is not stuck at once
        self._points: deque[tuple[float, int]] = deque(maxlen=max_points)

    def observe(self, step: int | None, now: float) -> None:
        if step is None or step == self.step:
            return
        if self.step is not None and step > self.step:
            self.changed_at = now
        self.step = step
        self._points.append((now, step))

    def age_s(self, now: float) -> float:
        """Seconds since the step last advanced (or since the start)."""
        return max(0.0, now - self.changed_at)

    def steps_per_s(self) -> float | None:
        """The rate between the advances remembered (None: fewer than two advances seen). The first point is when
        the step was first seen, not when it was reached, so it is left out: a wait before training would skew it."""
        points = list(self._points)[1:]
        if len(points) < 2:
            return None
        (t0, s0), (t1, s1) = points[0], points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


class Curves:
    """The training and the validation loss per step, newest ``max_steps`` steps kept; curves down-sampled to at
    most ``max_points`` points."""

    def __init__(self, *, max_steps: int = 100_000, max_points: int = 400) -> None:
        self.train: dict[int, float] = {}
        self.eval: dict[int, float] = {}
        self.max_steps = max_steps
        self.max_points = max_points

    def add(self, train: dict[int, float], evals: dict[int, float], *, own: bool) -> None:
        """Merge losses per step. This node's own (``own``) replace what the records said; the records' fill gaps."""
        for target, new in ((self.train, train), (self.eval, evals)):
            for step, loss in new.items():
                if own or step not in target:
                    target[step] = loss
            while len(target) > self.max_steps:
                del target[min(target)]

    def points(self, which: dict[int, float]) -> list[list[float]]:
        """[[step, loss], ...] sorted by step; evenly thinned to ``max_points`` (the last point always kept)."""
        steps = sorted(which)
        if len(steps) > self.max_points:
            stride = len(steps) / self.max_points
            steps = [steps[int(i * stride)] for i in range(self.max_points - 1)] + [steps[-1]]
        return [[s, round(which[s], 5)] for s in steps]
