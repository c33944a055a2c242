"""The validation loss (`Evaluation`): one driver of the swarm evaluates every ``eval.every_steps`` steps.

Which node: the driver with the lowest PeerID among the drivers in its view (trainers, and auto-role nodes of
stage 0), so the swarm computes one validation loss per due step. Two drivers whose views differ for a moment
may both evaluate a step: the held-out microbatches are the same on every node and the weights of a step are the
same on every replica, so they publish the same loss.

When: steps ``0, every_steps, 2 * every_steps, ...`` and ``max_steps``, with the weights after that many
updates. The evaluator runs the evaluation at the start of the step, before it drives any microbatch of it (the
step cannot close without its part, so every stage still holds that step's weights); at ``max_steps`` it runs from
the role's end (`final`), while the stage servers wait for its result before they leave (`wait_final`).

How: ``eval.batches`` held-out microbatches (`swarm.data.ShardedData.eval_microbatch`) go forward only through one
peer per stage (``stage.eval``, `swarm.training.eval_rpc`); the last stage answers the mean loss; the result, the
mean over samples, is published in the evaluator's `ProgressRecord` (``eval_step``, ``eval_loss``) and kept in its
summary. An evaluation that cannot finish (the step closed, no peer) is logged and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from swarm.data import ShardedData
from swarm.training.driver import Driver, Evaluator
from swarm.training.records import RunRecords
from swarm.training.stage_server import StaleStepError
from swarm.training.state import TrainerState
from swarm.training.wiring import NoPeerError

log = logging.getLogger(__name__)


class Evaluation:
    """Runs and publishes this node's validation losses, when it is the run's evaluator (module docstring)."""

    def __init__(
        self, state: TrainerState, *, records: RunRecords, driver: Driver, evaluator: Evaluator, data: ShardedData
    ) -> None:
        self.state = state
        self.records = records
        self.driver = driver
        self.evaluator = evaluator
        self.data = data
        self._lock = asyncio.Lock()
        self._tried: set[int] = set()  # steps evaluated, or given up

    @property
    def enabled(self) -> bool:
        return self.state.run_cfg.eval.every_steps > 0

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step this node has not tried yet."""
        every, max_steps = self.state.run_cfg.eval.every_steps, self.state.cfg.max_steps
        return every > 0 and step not in self._tried and (step % every == 0 or step == max_steps)

    def is_evaluator(self) -> bool:
        """Whether this node (a driver) has the lowest PeerID among the drivers it sees."""
        me = self.state.me
        return min([*self.state.view.drivers(), me]) == me

    async def before_step(self, step: int) -> None:
        """A driver, before it drives ``step``: evaluate it first if due and this node is the evaluator."""
        if self.due(step) and self.is_evaluator():
            async with self._lock:  # the other drive workers wait for it
                if self.due(step):
                    await self.run(step)
        elif self._lock.locked():  # another worker evaluates (`run` marked the step tried): wait, do not drive
            async with self._lock:  # the step on (its close would abandon the evaluation of its weights)
                pass

    async def final(self, max_steps: int, *, driver: bool) -> None:
        """At ``max_steps``: the evaluator (a driver) evaluates the final weights; a stage server waits for it."""
        if not self.enabled:
            return
        if driver and self.is_evaluator():
            async with self._lock:  # a drive worker may be running it already: wait for its result
                if self.due(max_steps):
                    await self.run(max_steps)
        elif self.state.server is not None:
            await self.wait_final(max_steps)

    async def wait_final(self, max_steps: int) -> None:
        """Keep serving until a validation loss of ``max_steps`` is in the records, at most ``finish_linger_s``."""
        st = self.state
        deadline = time.monotonic() + st.cfg.finish_linger_s
        while time.monotonic() < deadline:
            latest = st.view.latest_eval()
            if (latest is not None and latest[0] >= max_steps) or max_steps in st.eval_losses:
                return
            await st.wait_change(min(st.cfg.poll_interval_s, max(deadline - time.monotonic(), 0.01)))
        log.warning(
            "%s: no validation loss of step %d within %.0fs; leaving", st.me.short(), max_steps, st.cfg.finish_linger_s
        )

    async def run(self, step: int) -> None:
        """Evaluate the weights of ``step`` on the held-out microbatches, keep and publish the loss."""
        st = self.state
        self._tried.add(step)
        total, samples = 0.0, 0
        started = time.monotonic()
        try:
            for index in range(st.run_cfg.eval.batches):
                mb = await asyncio.to_thread(self.data.eval_microbatch, step, index)
                total += await self.driver.evaluate(mb, self.evaluator) * mb.num_samples
                samples += mb.num_samples
        except (StaleStepError, NoPeerError) as e:
            log.warning("%s: evaluation of step %d abandoned: %s", st.me.short(), step, e)
            return
        st.eval_losses[step] = total / max(samples, 1)
        log.info(
            "%s: validation loss at step %d: %.4f (%d samples, %.1fs)",
            st.me.short(),
            step,
            st.eval_losses[step],
            samples,
            time.monotonic() - started,
        )
        await self.records.publish_eval()
        st.notify()
