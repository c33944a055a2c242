"""Delayed parameter updates (`DelayedUpdate`): every-step averaging with the all-reduce off the step's path.

With ``[averaging] delayed_update = true`` (every_step mode) a stage server closes step ``s`` by applying the
averaged gradients of step ``s - 1`` (ready by then: they were averaged while step ``s`` computed), opening step
``s + 1`` at once, and only then averaging step ``s``'s gradients in the background (with the tied exchange). So
the weights of step ``s + 1`` are ``opt(W_s, avg g_{s-1})``: every gradient is applied one step late, as in
hivemind's delayed parameter updates, and a step's close waits on no round trip once the previous round is done.

The rules that keep replicas equal carry over with one step of lag:

- weights still change only together with the step number (at a close), so validators replay a step's work with
  the weights they download for that step;
- each round states the digest of the weights that computed its gradients (taken before the close's update); its
  verdict is settled (`swarm.training.replicas.Replicas.settle`) at the next close, where the update is applied;
- the pending update travels with the stage's state (``delayed.*`` in `StageServer.extra_state`) once its round is
  done: a node that downloads a step's state applies the update its peers apply at that step's close. A state
  taken before the round finished has none: its node then adopts a peer's next state at the close (``needs_sync``)
  and keeps its own round of that step's gradients, which it took part in, for the close after;
- the node's last step (``max_steps``) applies both pending updates, so a run ends with every gradient applied.

A checkpoint saved at a close holds no pending update (its round has just started): a node that resumes from it
adopts a peer's state at its first close, or, alone, skips that one update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from swarm.averaging.digests import DigestVerdict
from swarm.errors import SwarmError
from swarm.p2p.identity import PeerID
from swarm.training.replicas import Replicas
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState

log = logging.getLogger(__name__)

PREFIX = "delayed."
STEP_KEY = "delayed.step"  # the step whose averaged gradients ``delayed.grad.<i>`` are
GRAD = "delayed.grad."
REPLACE = "delayed.replace."  # the tied matrix's re-tie value, by parameter index


@dataclass(frozen=True)
class ClosedStep:
    """A closed step's work to average, and what its averaging entry states, fixed as the step closes (before a
    delayed update changes them): the digest of the weights that computed ``grads``, the samples (``weight``) and
    the state's age in steps. ``offenders`` are left out of this node's span; ``tied_peers`` hold the other copy
    of the tied matrix."""

    step: int
    grads: list[torch.Tensor]
    offenders: frozenset[PeerID]
    tied_peers: list[PeerID]
    digest: bytes
    weight: float
    age_steps: int


@dataclass(frozen=True)
class Pending:
    """The averaged gradients of ``step`` (with the tied part added), to apply at the close of ``step + 1``;
    ``averaged_s``: how long the all-reduce took (the rest of the round was the tied exchange)."""

    step: int
    grads: list[torch.Tensor]
    replace: dict[int, torch.Tensor] = field(default_factory=dict)
    verdict: DigestVerdict | None = None
    averaged_s: float = 0.0

    def to_extra(self) -> dict[str, torch.Tensor]:
        extra = {STEP_KEY: torch.tensor(self.step, dtype=torch.int64)}
        extra.update({f"{GRAD}{i}": g for i, g in enumerate(self.grads)})
        extra.update({f"{REPLACE}{i}": v for i, v in self.replace.items()})
        return extra

    @classmethod
    def from_extra(cls, extra: dict[str, torch.Tensor], step: int, params: list[torch.nn.Parameter]) -> Pending | None:
        """The pending update of ``step`` a downloaded (or loaded) state carries, if it holds a whole, well-formed
        one (it came from a peer: a tensor of the wrong shape or dtype, or not finite, is logged and ignored)."""
        held = extra.get(STEP_KEY)
        if held is None or held.numel() != 1 or int(held) != step:
            return None
        grads: list[torch.Tensor] = []
        for i, p in enumerate(params):
            g = extra.get(f"{GRAD}{i}")
            if g is None or not _like(g, p):
                log.warning("the pending update of step %d in the loaded state is malformed (gradient %d)", step, i)
                return None
            grads.append(g)
        replace: dict[int, torch.Tensor] = {}
        for key, value in extra.items():
            index = key[len(REPLACE) :]
            if not key.startswith(REPLACE):
                continue
            if not index.isdigit() or int(index) >= len(params) or not _like(value, params[int(index)]):
                log.warning("the pending update of step %d in the loaded state is malformed (%s)", step, key)
                return None
            replace[int(index)] = value
        return cls(step=step, grads=grads, replace=replace)


def _like(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``tensor`` can stand for a gradient (or value) of ``param``: same shape and dtype, all finite."""
    return tensor.shape == param.shape and tensor.dtype == param.dtype and bool(torch.isfinite(tensor).all())


# averages a closed step's gradients with the stage's peers and adds the tied part (`Stepper.average_round`)
RoundFn = Callable[[StageServer, ClosedStep], Awaitable[Pending]]


class DelayedUpdate:
    """Closes steps with the previous step's averaged gradients and averages the closed step's in the background."""

    def __init__(self, state: TrainerState, *, replicas: Replicas, average_round: RoundFn) -> None:
        self.state = state
        self.replicas = replicas
        self.average_round = average_round
        self._task: asyncio.Task[Pending] | None = None
        self._task_of: tuple[StageServer | None, int] = (None, -1)  # the server and step the running round averages

    async def finish_step(self, server: StageServer, closed: ClosedStep) -> tuple[float, float]:
        """Close ``closed.step``: apply the previous step's averaged gradients (or settle on a peer's state), open
        the next step, then average ``closed.grads`` in the background; on the node's last step average them first
        and apply both, so a run ends with every gradient applied. Returns the seconds spent waiting for the previous
        round, and averaging (the last step only) and applying."""
        step = closed.step
        started = time.monotonic()
        pending = await self._take(server, step - 1)
        waited = time.monotonic()
        round_ = self._round(server, closed)
        max_steps = self.state.cfg.max_steps
        if max_steps is not None and step + 1 >= max_steps:
            await self._apply(server, step, pending, last=await round_)
        else:
            await self._apply(server, step, pending)
            self._task, self._task_of = asyncio.create_task(round_), (server, step)
        return waited - started, time.monotonic() - waited

    async def _take(self, server: StageServer, step: int) -> Pending | None:
        """Step ``step``'s averaged gradients: this node's own round of it, else the ones its loaded state carries."""
        task, self._task = self._task, None
        if task is not None and self._task_of == (server, step):  # not a round of a stage this node left
            try:
                return await task
            except (SwarmError, OSError, TimeoutError) as e:  # the averager itself never raises on peer faults
                log.warning("%s: the averaging round of step %d failed: %s", self.state.me.short(), step, e)
                return None
        await self.cancel(task)
        if step < 0:
            return None
        return Pending.from_extra(server.extra_state, step, server.parameters())

    async def _apply(
        self, server: StageServer, step: int, pending: Pending | None, last: Pending | None = None
    ) -> None:
        """Open ``step + 1`` with ``pending`` applied (and then ``last``: the node's last step), or with a peer's
        state of it when the replicas rule says so (`Replicas.settle`)."""
        st = self.state
        if pending is None and step > 0:
            # a state loaded without the update its peers apply now (downloaded mid-round, or a checkpoint): take
            # a peer's next state (the reference replica keeps its own weights and skips the update)
            log.info(
                "%s: stage %d has no averaged gradients of step %d to apply", st.me.short(), server.index, step - 1
            )
            st.needs_sync = True
        if await self.replicas.settle(server, step + 1, None if pending is None else pending.verdict):
            return
        updates: list[tuple[list[torch.Tensor], dict[int, torch.Tensor]]] = []
        if pending is not None:
            # a re-tie of the last round was taken from the same weights as the pending one's (this step's)
            updates.append((pending.grads, {**pending.replace, **(last.replace if last else {})}))
        if last is not None:
            updates.append((last.grads, {} if pending is not None else last.replace))
        await asyncio.to_thread(server.apply_updates, updates, new_step=step + 1, extra_state={})
        st.state_age_steps += 1

    async def _round(self, server: StageServer, closed: ClosedStep) -> Pending:
        """The closed step's round; once done, its result travels with the state of the step after it."""
        pending = await self.average_round(server, closed)
        with server.lock:
            if server.step == closed.step + 1:
                server.extra_state = pending.to_extra()
        return pending

    async def cancel(self, task: asyncio.Task[Pending] | None = None) -> None:
        """Cancel a round still running (``task``, or this node's own when None): the node stops or moved on."""
        if task is None:
            task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
