"""local_sgd mode (run config ``[averaging] mode = "local_sgd"``, DiLoCo): inner steps, and an outer sync every
``inner_steps`` steps.

`OuterSync.finish_step` replaces the every-step all-reduce of `swarm.training.stepping.Stepper.finish_step`:

- **Inner step.** The replica applies its inner optimizer (the run's, AdamW by default) to the mean gradients of the
  microbatches it served, with no all-reduce; replicas of a stage drift apart until the next sync.
- **Outer sync** (closing step ``s`` with ``(s + 1) % inner_steps == 0``, and the node's last step ``max_steps``,
  whose weights are then the synced ones, with no inner update). The pseudo-gradient ``anchor - weights``
  (``anchor``: the weights of the last sync) goes through ``hooks.gradients_to_average`` (a sign-flip cheater flips
  it) and, with ``outer_compression = "topk_q"``, through error feedback and `topk_quantize`; the stage's peers
  all-reduce it (the averager's codec is then the lossless ``sparse``; `reduction` and the gradient checks apply as
  in every-step mode), weighted by the samples each served since the last sync. Each applies Nesterov SGD
  (`outer_step`) to the anchor; the result is the new anchor and, with this step's own inner update on top, the
  weights of step ``s + 1``, set in one locked section (`StageServer.apply_step` with ``replace``), so weights change
  only together with the step number. Every replica holds the same anchor and momentum, so they meet again exactly.
- **Replica digests.** Members state the digest of their anchor (not of their drifting weights): the rule of
  `swarm.training.replicas` then applies at syncs only, never between them.
- **Tied embeddings** are synced with the outer step (`swarm.training.tied.TiedService.exchange_outer`).
- **State.** The anchor and the outer momentum travel with the stage's state (``outer.anchor.<i>``,
  ``outer.momentum.<i>`` in `StageServer.extra_state`): a node that joins between syncs downloads a peer's state,
  i.e. the state at the last sync plus that peer's inner progress, and takes part in the next sync (its
  pseudo-gradient counts that peer's progress again, weighted by its own samples only). The error-feedback residual
  is this node's own and starts at zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from swarm.averaging import Averager
from swarm.averaging.digests import DigestVerdict, digest_majority, weights_digest
from swarm.compression.feedback import ErrorFeedback
from swarm.compression.sparse import topk_quantize
from swarm.dht.keys import averaging_group_key
from swarm.training.replicas import Replicas
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState
from swarm.training.tied import TiedService, tied_index
from swarm.training.verifying import NodeVerification

log = logging.getLogger(__name__)

ANCHOR, MOMENTUM = "outer.anchor.", "outer.momentum."


def outer_step(
    anchor: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    pseudo_grads: Sequence[torch.Tensor],
    *,
    lr: float,
    momentum_factor: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Nesterov SGD on the anchor (as ``torch.optim.SGD(nesterov=True)``): ``m = mu * m + g``,
    ``anchor - lr * (g + mu * m)``. Returns (new weights, new momentum), new tensors."""
    weights, buffers = [], []
    for a, m, g in zip(anchor, momentum, pseudo_grads, strict=True):
        m_new = m * momentum_factor + g
        weights.append(a - (g + m_new * momentum_factor) * lr)
        buffers.append(m_new)
    return weights, buffers


class OuterSync:
    """Inner steps and outer syncs of the served stage (see the module docstring)."""

    def __init__(
        self,
        state: TrainerState,
        *,
        checks: NodeVerification,
        averager: Averager,
        tied: TiedService,
        replicas: Replicas,
    ) -> None:
        self.state = state
        self.settings = state.run_cfg.averaging
        self.checks = checks
        self.averager = averager
        self.tied = tied
        self.replicas = replicas
        self.samples_since_sync = 0
        self.syncs = 0
        self._feedback: list[ErrorFeedback] = []
        self._server: StageServer | None = None

    async def finish_step(self, server: StageServer, step: int) -> None:
        """Close ``step`` (already closed for work): an inner step, and at a sync step the outer step first."""
        st = self.state
        if server is not self._server:  # another stage (or a rebuilt one): its own samples and residual
            self._server, self.samples_since_sync, self._feedback = server, 0, []
        await asyncio.to_thread(self.ensure_anchor, server)
        grads = await asyncio.to_thread(server.mean_gradients)
        self.samples_since_sync += server.samples
        started = time.monotonic()
        replace: dict[int, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] | None = None
        if self.is_sync_step(step):
            outcome = await self._sync(server, step)
            if outcome is None:  # this replica took a peer's state of the next step instead
                return
            replace, extra = outcome
        synced = time.monotonic()
        # a run's last step ends on the synced weights: the replicas finish bit-identical (its inner update is dropped)
        last = extra is not None and st.cfg.max_steps is not None and step + 1 == st.cfg.max_steps
        await asyncio.to_thread(server.apply_step, grads, replace=replace, extra_state=extra, optimize=not last)
        st.state_age_steps += 1
        now = time.monotonic()
        elapsed, st.step_opened = now - st.step_opened, now
        log.info(
            "%s: stage %d step %d done (local_sgd, %s; %d samples served in all; %.2fs: %.3fs outer sync, "
            "%.3fs optimizer)",
            st.me.short(),
            server.index,
            step,
            "outer sync" if extra is not None else "inner step",
            server.total_samples,
            elapsed,
            synced - started,
            now - synced,
        )

    def is_sync_step(self, step: int) -> bool:
        """Whether closing ``step`` ends with an outer sync: every ``inner_steps``-th step, and the node's last step
        (``max_steps``), so that a run ends with its replicas synced."""
        max_steps = self.state.cfg.max_steps
        return self.settings.is_sync_step(step) or (max_steps is not None and step + 1 == max_steps)

    def ensure_anchor(self, server: StageServer) -> None:
        """Give ``server`` an anchor (its weights now) and zero momentum when its state came without them (the run's
        start, or weights this node had rather than downloaded): called before any inner step changes them."""
        with server.lock:
            params = server.parameters()
            if all(f"{ANCHOR}{i}" in server.extra_state for i in range(len(params))):
                return
            extra = {f"{ANCHOR}{i}": p.detach().cpu().clone() for i, p in enumerate(params)}
            extra |= {f"{MOMENTUM}{i}": torch.zeros_like(t) for i, t in enumerate(extra.values())}
            server.extra_state = extra

    async def _sync(
        self, server: StageServer, step: int
    ) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]] | None:
        """The outer step at ``step``: the parameters to set and the new extra state; None when this replica took a
        peer's state of ``step + 1`` instead (its anchor lost the digest vote, or it averaged alone)."""
        st = self.state

        def pseudo_gradients() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
            with server.lock:
                n = len(server.parameters())
                anchor = [server.extra_state[f"{ANCHOR}{i}"] for i in range(n)]
                momentum = [server.extra_state[f"{MOMENTUM}{i}"] for i in range(n)]
                deltas = [a - p.detach().cpu() for a, p in zip(anchor, server.parameters(), strict=True)]
            return anchor, momentum, deltas

        anchor, momentum, deltas = await asyncio.to_thread(pseudo_gradients)
        deltas = self.checks.hooks.gradients_to_average(step, deltas)
        sent = await asyncio.to_thread(self._compress, deltas)
        verdict = await self._average(server, step, sent, weights_digest(anchor))
        if await self.replicas.settle(server, step + 1, verdict):
            self.samples_since_sync = 0
            return None
        weights, momentum = await asyncio.to_thread(
            outer_step,
            anchor,
            momentum,
            sent,
            lr=self.settings.outer_lr,
            momentum_factor=self.settings.outer_momentum,
        )
        index = tied_index(server)
        num_stages = st.run_cfg.pipeline.num_stages
        if index is not None and num_stages > 1:
            other = num_stages - 1 if server.index == 0 else 0
            trusted = [p for p in st.view.stage_peers(other) if p not in self.checks.offenders()]
            update = weights[index] - anchor[index]
            tied = await self.tied.exchange_outer(
                server, step, update, anchor[index], st.rng.sample(trusted, len(trusted))
            )
            if tied is not None:
                weights[index] = tied
        self.samples_since_sync = 0
        self.syncs += 1
        extra = {f"{ANCHOR}{i}": w.clone() for i, w in enumerate(weights)}
        extra |= {f"{MOMENTUM}{i}": m for i, m in enumerate(momentum)}
        return dict(enumerate(weights)), extra

    def _compress(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """``topk_q``: each pseudo-gradient plus its residual, top-k and quantized (the residual keeps the rest);
        ``none``: as they are (float32 copies, averaged in place)."""
        if self.settings.outer_compression == "none":
            return [d.float().clone() for d in deltas]
        if len(self._feedback) != len(deltas):
            self._feedback = [ErrorFeedback(d) for d in deltas]
        sent = []
        for feedback, delta in zip(self._feedback, deltas, strict=True):
            compensated = feedback.compensate(delta)
            transmitted = topk_quantize(
                compensated, fraction=self.settings.outer_topk_fraction, bits=self.settings.outer_bits
            )
            feedback.record(compensated, transmitted)
            sent.append(transmitted)
        return sent

    async def _average(
        self, server: StageServer, step: int, sent: list[torch.Tensor], digest: bytes
    ) -> DigestVerdict | None:
        """All-reduce ``sent`` in place with the stage's peers (as `Stepper._average` does the gradients, with the
        anchor's digest); the verdict on the members' anchors (None: no vote)."""
        st = self.state
        confirmed = self.checks.confirmed_offenders()
        offenders = self.checks.offenders()
        others = [p for p in st.view.stage_peers(server.index) if p != st.me and p not in confirmed]
        if not others:
            return None
        st.last_digest = digest
        result = await self.averager.step(
            sent,
            weight=max(float(self.samples_since_sync), 1e-3),
            group_key=averaging_group_key(st.run_id, server.index, step),
            target_group_size=len(others) + 1,
            exclude=offenders,
            avoid=confirmed,
            state_digest=digest,
            state_age_steps=st.state_age_steps,
        )
        await self.checks.inspect(step, server.index, result.inspected)
        if not result.with_others:
            log.warning(
                "%s: outer sync at step %d of stage %d averaged alone (peers: %d); will adopt a peer's next state",
                st.me.short(),
                step,
                server.index,
                len(others),
            )
            st.needs_sync = True
            return None
        return digest_majority(result.members)
