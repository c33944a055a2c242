"""`TrainerState`: the one declared state the training role's collaborators share.

The role is a handful of collaborators built by `swarm.training.trainer.build_training_role`: the run's records and
view (`swarm.training.records`), stepping (`swarm.training.stepping`), driving (`swarm.training.driving`),
rebalancing (`swarm.training.rebalancing`) and state sync (`swarm.training.sync`). Each reads and writes this
object, which it receives in its constructor; nothing else is shared. Besides the fields, it answers the questions
every part asks of them (the current step, the samples of a step) and wakes the loops waiting for a change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from swarm.p2p import Transport
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig
from swarm.training.claims import StepEvidence, step_evidence
from swarm.training.node_role import Role
from swarm.training.stage_server import StageServer
from swarm.training.training_config import TrainingConfig
from swarm.training.view import SwarmView
from swarm.training.wiring import PeerSelector

MAX_STEP_TIMES = 10_000  # step finish times a node keeps for its summary


@dataclass(eq=False, kw_only=True)
class TrainerState:
    """What the training role's collaborators share: its config and transport, the stage it serves, the run's
    view, and this node's per-step counters. Per-step dicts are keyed by step."""

    cfg: TrainingConfig
    transport: Transport
    dht: Any  # a `swarm.dht.DHT` (tests pass one, or an in-memory store with the same methods)
    rng: random.Random
    selectors: list[PeerSelector[PeerID]]  # one per stage: which peer of the stage to call next
    server: StageServer | None = None  # the stage this node serves (None: a trainer, or between stages)
    view: SwarmView = field(default_factory=SwarmView)
    my_samples: dict[int, int] = field(default_factory=dict)  # samples this node drove to completion
    inflight: dict[int, int] = field(default_factory=dict)  # samples of this node's microbatches in flight
    next_index: dict[int, int] = field(default_factory=dict)  # the next microbatch index of this node's shard
    losses: dict[int, list[float]] = field(default_factory=dict)  # the losses of this node's microbatches
    eval_losses: dict[int, float] = field(default_factory=dict)  # the validation losses this node computed
    started: float = field(default_factory=time.monotonic)
    samples_driven: int = 0
    first_sample_time: float | None = None
    finished_time: float | None = None  # when max_steps was reached (the run's end, lingering excluded)
    step_times: dict[int, float] = field(default_factory=dict)  # step -> when the served stage finished it (wall)
    needs_sync: bool = False  # the last step was averaged alone: adopt a peer's next state
    state_age_steps: int = 0  # steps applied since the served weights were last loaded (digest tie-break)
    last_digest: bytes = b""  # the served weights' digest stated at the last averaging
    diverged_steps: int = 0  # consecutive steps this replica's digest lost the vote and could not be reconciled
    published: float = 0.0  # when this driver last published its progress (monotonic)
    published_samples: dict[int, int] = field(default_factory=dict)  # the step and samples last published
    behind_since: float | None = None  # since when the served stage is behind the swarm
    step_opened: float = field(default_factory=time.monotonic)  # when the served step opened
    refresh_now: asyncio.Event = field(default_factory=asyncio.Event)  # a step hint: re-read the records now
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced on each `notify`

    @property
    def run_cfg(self) -> RunConfig:
        return self.cfg.run

    @property
    def run_id(self) -> str:
        return self.cfg.run.run_id

    @property
    def me(self) -> PeerID:
        return self.transport.peer_id

    def stage(self) -> int | None:
        """The stage this node serves now (None: none)."""
        return self.server.index if self.server is not None else None

    def current_step(self) -> int:
        """The served stage's step; without a stage, the slowest stage's newest step."""
        if self.server is not None:
            return self.server.step
        steps = [self.view.newest_step(s)[1] for s in range(self.run_cfg.pipeline.num_stages)]
        return max(0, min(steps)) if steps else 0

    def drives(self) -> bool:
        """Whether this node drives microbatches now (a trainer, or an ``auto`` node serving stage 0)."""
        return self.cfg.role == Role.TRAINER or (self.cfg.role == Role.AUTO and self.stage() == 0)

    def step_evidence(self, exclude: Collection[PeerID] = ()) -> StepEvidence:
        """The step-claim rule (`swarm.training.claims`) applied to the view: what the OTHER peers' records back
        (``exclude``: peers caught cheating, left out)."""
        return step_evidence(
            self.view.peers,
            self.view.progress,
            me=self.me,
            exclude=exclude,
            target_batch_size=self.run_cfg.batch.target_batch_size,
            own_step=self.current_step() if self.drives() else None,
        )

    def swarm_step(self, exclude: Collection[PeerID] = ()) -> int:
        """The run's step as the claim rule believes it (0 when no other peer has a record)."""
        believed = self.step_evidence(exclude).believed
        return 0 if believed is None else believed

    def stage_sources(self, stage: int, exclude: Collection[PeerID] = ()) -> list[tuple[PeerID, int]]:
        """Other peers of ``stage`` whose step the claim rule believes (``exclude`` left out), newest first: where
        this node may download the stage's state. Never this node itself (its record may be a previous life's)."""
        evidence = self.step_evidence(exclude)
        found = [
            (p, r.step)
            for p, r in self.view.peers.items()
            if r.stage == stage and p != self.me and p not in exclude and evidence.backs(r.step)
        ]
        return sorted(found, key=lambda item: (-item[1], item[0].to_bytes()))

    def record_step_time(self, step: int) -> None:
        """Note when the served stage finished ``step`` (the newest ``MAX_STEP_TIMES`` are kept, for the summary)."""
        self.step_times[step] = time.time()
        while len(self.step_times) > MAX_STEP_TIMES:
            del self.step_times[next(iter(self.step_times))]

    def step_samples(self, step: int) -> int:
        """The samples of ``step`` done so far: the others' progress records plus this node's own count."""
        others = sum(r.samples for p, r in self.view.progress.items() if p != self.me and r.step == step)
        return others + self.my_samples.get(step, 0)

    def notify(self) -> None:
        """Wake every loop waiting in `wait_change` (the view, a step or this node's progress changed)."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_step(self, step: int, timeout_s: float) -> None:
        """Return once the served stage is at ``step`` or past it (or serves none), or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.server is not None and self.server.step < step:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self.wait_change(min(left, self.cfg.poll_interval_s / 4))

    async def wait_change(self, timeout_s: float) -> None:
        """Return on the next `notify`, or after ``timeout_s``."""
        event = self.changed
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass
