"""Drivers: push microbatches through the pipeline, forward stage by stage, loss at the last, backward back.

A driver (a stage-0 node, or a node started with ``--role trainer``) draws microbatches from its deterministic
shard and sends each through one peer per stage chosen by stochastic wiring (`swarm.training.wiring`). The backward of
an inner stage goes first to the peer that ran its forward (which kept the graph); if that peer fails, another
replica of the stage recomputes from the resent inputs. A microbatch counts only once its stage-0 backward
completes; a failed one is retried whole (same samples) until its step closes, never silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from swarm.data import Microbatch
from swarm.configs import Config, setting
from swarm.errors import ConfigError, RemoteError, SwarmError
from swarm.training.stage_server import StaleStepError
from swarm.training.wiring import NoPeerError, PeerDeadlineError, PeerSelector, call_with_retry, call_within_deadline

log = logging.getLogger(__name__)


class StageClient(Protocol):
    """How a driver reaches a stage replica (a remote peer over RPC, or this node's own stage server)."""

    async def forward(
        self, peer: Any, *, stage: int, step: int, microbatch_id: str, inputs: torch.Tensor
    ) -> torch.Tensor: ...

    async def backward(
        self,
        peer: Any,
        *,
        stage: int,
        step: int,
        microbatch_id: str,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, float | None]: ...


class Evaluator(Protocol):
    """How a driver reaches a stage replica for the validation loss (`swarm.training.eval_rpc.EvalClient`)."""

    async def evaluate(
        self, peer: Any, *, stage: int, step: int, inputs: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, float | None]: ...


class DriverConfig(Config, section="driver"):
    """Retries of one microbatch: after a failure wait ``retry_wait_s`` (give up after ``max_microbatch_attempts``);
    when a replica is at another step wait ``stale_wait_s``, doubling up to 4x while it stays there (at most
    ``max_stale_retries`` tries in all)."""

    retry_wait_s: float = setting(default=0.5, ge=0, le=600, doc="Seconds to wait after a failed microbatch.")
    max_microbatch_attempts: int = setting(default=20, ge=1, le=10_000, doc="Tries of one microbatch before giving up.")
    stale_wait_s: float = setting(default=0.05, ge=0, le=60, doc="Seconds to wait when a replica is at another step.")
    max_stale_retries: int = setting(default=1000, ge=1, le=1_000_000, doc="Most waits for a replica at another step.")


STALE_BACKOFF_DOUBLINGS = 2  # a lagging replica is retried after stale_wait_s, then 2x, then 4x it


def is_stale_step(error: BaseException) -> bool:
    """Whether ``error`` (local, or a peer's answer by its code) says the step is over or not open: no ban, no retry."""
    return isinstance(error, StaleStepError) or (isinstance(error, RemoteError) and error.code == StaleStepError.code)


class _Stale(SwarmError):
    """Internal: a peer's answer said the step is over (raised inside a call so that no peer is banned)."""

    code = "stale_reply"


class Driver:
    """Runs one microbatch at a time through the pipeline; `run_microbatch` is safe to call concurrently."""

    def __init__(
        self,
        cfg: DriverConfig,
        *,
        num_stages: int,
        client: StageClient,
        peers_of: Callable[[int], Sequence[Any]],
        selectors: Sequence[PeerSelector[Any]],
        step_of: Callable[[], int],
        name: str = "driver",
    ) -> None:
        if len(selectors) != num_stages:
            raise ConfigError(f"selectors: need one per stage ({num_stages}), got {len(selectors)}")
        self.cfg = cfg
        self.num_stages = num_stages
        self.client = client
        self.peers_of = peers_of
        self.selectors = selectors
        self.step_of = step_of
        self.name = name

    async def run_microbatch(self, mb: Microbatch) -> float:
        """Forward, loss, backward for ``mb``; retries until done. Returns the loss.

        Raises StaleStepError when the step closes first (the microbatch is then not counted anywhere it
        matters: the step's averaging has started), NoPeerError after ``max_microbatch_attempts``.
        """
        return await self._retried(mb, f"{self.name}/{mb.step}/{mb.index}", self._pipeline)

    async def evaluate(self, mb: Microbatch, evaluator: Evaluator) -> float:
        """The mean loss of held-out ``mb`` with the weights of step ``mb.step``: forward only through one peer per
        stage (``stage.eval`` with ``evaluator``), nothing accumulated; retried as `run_microbatch` retries."""

        async def pipeline(mb: Microbatch, mb_id: str) -> float:
            last, acts = self.num_stages - 1, mb.inputs
            for stage in range(self.num_stages):
                targets = mb.targets if stage == last else None

                async def call(p: Any, s: int = stage, x: torch.Tensor = acts, t: torch.Tensor | None = targets) -> Any:
                    return await evaluator.evaluate(p, stage=s, step=mb.step, inputs=x, targets=t)

                _, (out, loss) = await self._call(stage, mb, f"evaluation {mb_id}", call, kind="evaluation")
                if stage == last:
                    if loss is None:
                        raise SwarmError(f"the last stage answered evaluation {mb_id} without a loss")
                    return float(loss)
                acts = out
            raise SwarmError("internal: a pipeline without stages")

        return await self._retried(mb, f"{self.name}/eval/{mb.step}/{mb.index}", pipeline)

    async def _retried(self, mb: Microbatch, mb_id: str, pipeline: Callable[[Microbatch, str], Any]) -> float:
        attempt, tries, stale_streak = 0, 0, 0
        while attempt < self.cfg.max_microbatch_attempts and tries < self.cfg.max_stale_retries:
            tries += 1
            if self.step_of() != mb.step:
                raise StaleStepError(f"step {mb.step} closed before microbatch {mb_id} completed")
            try:
                return float(await pipeline(mb, f"{mb_id}#{tries}"))
            except _Stale:
                # a stage replica is at another step: ours closed (checked above) or it lags; wait, same samples.
                # Each try resends the activations, so the wait doubles (to 4x stale_wait_s) while the replica lags
                await asyncio.sleep(self.cfg.stale_wait_s * (1 << min(stale_streak, STALE_BACKOFF_DOUBLINGS)))
                stale_streak += 1
                continue
            except NoPeerError as e:
                log.warning("%s: microbatch %s attempt %d: %s", self.name, mb_id, attempt + 1, e)
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning(
                    "%s: microbatch %s attempt %d failed (%s: %s); retrying it",
                    self.name,
                    mb_id,
                    attempt + 1,
                    type(e).__name__,
                    e,
                )
            attempt += 1
            await asyncio.sleep(self.cfg.retry_wait_s)
        if attempt < self.cfg.max_microbatch_attempts:
            log.warning(
                "%s: microbatch %s: a replica stayed at another step for %d tries; drawing a new one",
                self.name,
                mb_id,
                tries,
            )
            raise StaleStepError(f"microbatch {mb_id}: a stage replica stayed at another step than {mb.step}")
        raise NoPeerError(f"{self.name}: microbatch {mb_id} failed {attempt} times ({tries} tries)")

    async def _pipeline(self, mb: Microbatch, mb_id: str) -> float:
        last = self.num_stages - 1
        acts: list[torch.Tensor] = [mb.inputs]
        forward_peers: list[Any] = []
        for stage in range(last):

            async def forward(p: Any, s: int = stage) -> torch.Tensor:
                return await self.client.forward(p, stage=s, step=mb.step, microbatch_id=mb_id, inputs=acts[s])

            peer, out = await self._call(stage, mb, "forward", forward, kind="forward")
            forward_peers.append(peer)
            acts.append(out)
        _, (grad, loss) = await self._call(
            last,
            mb,
            "loss+backward",
            lambda p: self.client.backward(
                p, stage=last, step=mb.step, microbatch_id=mb_id, inputs=acts[last], targets=mb.targets
            ),
            kind="loss+backward",
        )
        for stage in range(last - 1, -1, -1):
            grad_out = grad

            async def call(
                p: Any, s: int = stage, g: torch.Tensor | None = grad_out
            ) -> tuple[torch.Tensor | None, float | None]:
                return await self.client.backward(
                    p, stage=s, step=mb.step, microbatch_id=mb_id, inputs=acts[s], grad_outputs=g
                )

            _, (grad, _) = await self._call(stage, mb, "backward", call, kind="backward", prefer=forward_peers[stage])
        if loss is None:
            raise SwarmError(f"the last stage answered microbatch {mb_id} without a loss")
        return loss

    async def _call(
        self, stage: int, mb: Microbatch, what: str, call: Callable[[Any], Any], *, kind: str, prefer: Any = None
    ) -> tuple[Any, Any]:
        """``call`` on a peer of ``stage`` (``prefer`` first, if usable), each try cut at that peer's adaptive
        deadline for ``kind`` (wiring.py): a peer gone dark costs a few of its call times, not the RPC deadline."""

        async def guarded(peer: Any) -> Any:
            try:
                return await call(peer)
            except (StaleStepError, RemoteError) as e:
                if is_stale_step(e):
                    raise _Stale(str(e)) from None
                raise

        selector = self.selectors[stage]
        if prefer is not None and prefer in self.peers_of(stage) and not selector.is_banned(prefer):
            try:
                result, _ = await call_within_deadline(selector, prefer, guarded, kind=kind)
                return prefer, result
            except _Stale:
                raise
            except (SwarmError, TimeoutError, OSError) as e:
                selector.report_failure(prefer, missed_deadline=isinstance(e, PeerDeadlineError))
                log.warning(
                    "%s: %s on stage %d failed at the forward's peer (%s); recomputing on another replica",
                    self.name,
                    what,
                    stage,
                    e,
                )
        return await call_with_retry(
            selector,
            lambda: self.peers_of(stage),
            guarded,
            num_samples=mb.num_samples,
            what=f"{what} on stage {stage}",
            kind=kind,
            passthrough=(_Stale,),
        )
