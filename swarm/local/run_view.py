"""What `swarm-node local` shows while a run trains: its numbers, computed once here and drawn by `live_view`.

The launcher reads the run's DHT records every few seconds (`swarm.training.view.SwarmView`), turns them into a
`Snapshot` and feeds it to a `RunViewModel` with the time it read them; at the end it hands the model the run's
summary (`RunViewModel.finish`). The model is pure (an injected clock), so its numbers are tested from a script.

**samples/s, the one throughput figure**: samples of completed optimizer steps per second of wall time, that is
``batch.target_batch_size x completed steps / seconds`` (`step_samples_per_s`). While the run trains, the steps and
seconds are counted from the first step completion the launcher saw (so the time nodes spent starting, and the
first step's warm-up, are left out); the final figure counts every step from the run's first sample to its last
step (the nodes' summaries). No per-stage figure is shown beside it: a stage record's ``throughput`` is its
servers' compute speed (samples per busy second), a different quantity.

**ETA**: the steps left divided by the rate of completed steps above, to the last step (stopping the nodes takes
a few seconds more). Unknown until two step completions were seen.

**Final frame**: the records of stopping nodes expire, so once any node process has exited (``finishing``) a
snapshot with fewer peers does not replace the stages last seen; the final frame shows the stages, steps and
losses of the run's summary (read from the nodes' own summary files), or the stages last seen where it names none.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from swarm.training.view import SwarmView


def step_samples_per_s(steps: float, batch_size: int, seconds: float) -> float | None:
    """The launcher's throughput: samples of ``steps`` completed optimizer steps per second (None: no time)."""
    return steps * batch_size / seconds if seconds > 0 else None


@dataclass(frozen=True, kw_only=True)
class StageRow:
    """One pipeline stage as the records show it."""

    stage: int
    peers: tuple[str, ...]  # PeerIDs (base58), sorted
    step: int | None  # the newest optimizer step of its peers
    reachability: Mapping[str, int] = field(default_factory=dict)  # status -> peers; empty: not reported


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The run's records at one moment: stages, trainers, completed steps, the latest losses."""

    stages: tuple[StageRow, ...]
    trainers: int = 0
    step: int | None = None  # completed steps: the newest step the drivers feed or the stages reached
    loss: float | None = None
    eval: tuple[int, float] | None = None  # (step of the weights, validation loss)

    @property
    def num_peers(self) -> int:
        return sum(len(s.peers) for s in self.stages) + self.trainers


def snapshot_of(view: SwarmView, num_stages: int) -> Snapshot:
    """The `Snapshot` of a parsed view. A peer record's ``reachability`` (when records carry one) is counted."""
    summary = view.summary(num_stages)
    rows = []
    for st in summary["stages"]:
        statuses = Counter(
            str(reach)
            for record in view.peers.values()
            if record.stage == st["stage"] and (reach := getattr(record, "reachability", None)) is not None
        )
        rows.append(StageRow(stage=st["stage"], peers=tuple(st["peers"]), step=st["step"], reachability=dict(statuses)))
    steps = [s for s in (summary["step"], *(st["step"] for st in summary["stages"])) if s is not None]
    return Snapshot(
        stages=tuple(rows),
        trainers=len(summary["trainers"]),
        step=max(steps, default=None),
        loss=summary["loss"],
        eval=summary["eval"],
    )


class RunViewModel:
    """The numbers the launcher shows: step k of N, losses, samples/s, ETA, the stages, the dashboard URL."""

    def __init__(
        self, *, total_steps: int, batch_size: int, num_stages: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.clock = clock
        self.dashboard_url: str | None = None
        self.stages: tuple[StageRow, ...] = tuple(StageRow(stage=s, peers=(), step=None) for s in range(num_stages))
        self.trainers = 0
        self.step = 0
        self.loss: float | None = None
        self.eval: tuple[int, float] | None = None
        self.samples_per_s: float | None = None
        self.eta_s: float | None = None
        self.observed = False  # a snapshot was read
        self.finishing = False
        self.done = False
        self._anchor: tuple[float, int] | None = None  # (time, steps) of the first step completion seen

    def observe(self, snap: Snapshot, *, finishing: bool = False) -> None:
        """Take the records read now. ``finishing``: some node process has exited (its records may be gone)."""
        now = self.clock()
        self.observed = True
        self.finishing = self.finishing or finishing
        if not (self.finishing and snap.num_peers < self.num_peers):
            self.stages, self.trainers = snap.stages, snap.trainers
        self.loss = snap.loss if snap.loss is not None else self.loss
        self.eval = snap.eval if snap.eval is not None else self.eval
        step = min(snap.step or 0, self.total_steps)
        if step > self.step:
            if self._anchor is None:
                self._anchor = (now, step)
            self.step = step
        self._rates(now)

    def _rates(self, now: float) -> None:
        if self._anchor is None or self.step <= self._anchor[1]:
            return  # one completion seen: no rate yet (the step it completed may have begun long ago)
        start, first = self._anchor
        self.samples_per_s = step_samples_per_s(self.step - first, self.batch_size, now - start)
        if self.samples_per_s:
            self.eta_s = (self.total_steps - self.step) * self.batch_size / self.samples_per_s

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended: the summary's steps, losses and (whole-run) samples/s; the stages last seen stay."""
        self.done = True
        self.step = int(summary.get("steps") or self.step)
        if summary.get("final_loss") is not None:
            self.loss = float(summary["final_loss"])
        curve = summary.get("eval_curve") or []
        if curve:
            self.eval = (int(curve[-1][0]), float(curve[-1][1]))
        self._final_stages(summary.get("stages") or [])
        whole = step_samples_per_s(self.step, self.batch_size, float(summary.get("elapsed_s") or 0.0))
        self.samples_per_s = whole if whole is not None else self.samples_per_s
        self.eta_s = 0.0 if self.step >= self.total_steps else None

    def _final_stages(self, stages: list[list[str]]) -> None:
        """The stages as the nodes' summaries name them (where they ended, at the summary's step), when they name
        any; a stage's reachability last read stays."""
        if not any(stages):
            return
        before = {row.stage: row for row in self.stages}
        self.stages = tuple(
            StageRow(
                stage=s,
                peers=tuple(sorted(peers)),
                step=self.step if peers else None,
                reachability=before[s].reachability if s in before else {},
            )
            for s, peers in enumerate(stages)
        )

    @property
    def num_peers(self) -> int:
        return sum(len(s.peers) for s in self.stages) + self.trainers
