"""A stage server's compute: forward, backward (loss at the last stage), gradient and sample accumulation.

Pure and synchronous (the node calls it through ``asyncio.to_thread``); one lock serialises compute so
concurrent requests never race on ``.grad``. Gradients accumulate as sums over samples (the last stage
back-propagates ``loss * num_samples``); `StageServer.mean_gradients` divides by the samples served, so the
all-reduce weighted by samples gives the mean over the whole step.

Backward works on any replica: if this server ran the forward of the microbatch it reuses the retained
autograd graph (a bounded window keyed by microbatch id), otherwise it recomputes from the resent inputs.
Work tagged with a step other than the current one, or arriving while the step is closed for averaging, is
rejected. The compute itself is `swarm.training.compute`, which the validator's replay runs as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from swarm.averaging.digests import weights_digest
from swarm.configs import Config, setting
from swarm.errors import SwarmError
from swarm.model.optim import set_step_lr
from swarm.model.stages import StageInputError, StageModel
from swarm.run.config import OptimizerConfig
from swarm.training.compute import input_grad, loss_backward, outputs_backward, stage_forward, stage_loss

log = logging.getLogger(__name__)


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    """``p``'s gradient buffer: `StageServer.zero_grad` gives every trained parameter one when it is built."""
    if p.grad is None:
        raise SwarmError("internal: a trained parameter has no gradient buffer (zero_grad was not called)")
    return p.grad


class StaleStepError(SwarmError):
    """The request names another step than this server's, or the step is closed for averaging; retry."""

    code = "stale_step"


class StageServerConfig(Config, section="stage_server"):
    """Limits of one stage server."""

    max_batch: int = setting(default=64, ge=1, le=1 << 20, doc="Most samples in one request.")
    retained_graphs: int = setting(default=16, ge=0, le=4096, doc="Forward graphs kept for a backward on this replica.")


class StageServer:
    """Serves one stage: ``forward``, ``backward``, ``loss_backward``; then ``apply_step`` with averaged grads."""

    def __init__(
        self,
        model: StageModel,
        optimizer: torch.optim.Optimizer,
        optimizer_cfg: OptimizerConfig,
        cfg: StageServerConfig,
        *,
        step: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.optimizer_cfg = optimizer_cfg
        self.cfg = cfg
        self.step = step
        self.samples = 0
        self.busy_s = 0.0
        self.total_samples = 0
        self.accepting = True
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self._graphs: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # tensors that travel with the stage's state besides the model and optimizer (``outer.*``: the local_sgd
        # outer optimizer's, `swarm.training.outer_sync`); replaced under the lock, with the weights
        self.extra_state: dict[str, torch.Tensor] = {}
        # verification: the digest of the weights each step's work was computed with (taken under the lock with the
        # first work of the step, dropped whenever the weights may change), for the work claims to name them
        self.names_weights = False
        self._digests: dict[int, bytes] = {}
        self.zero_grad()

    @property
    def index(self) -> int:
        return self.model.index

    # ---- serving -------------------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, *, step: int, microbatch_id: str) -> torch.Tensor:
        """Outputs of this stage for ``inputs``; keeps the graph for a backward on this replica."""
        self._check(inputs, step)
        inputs = inputs.to(self.device)
        with self.lock:
            self._check_step(step)
            started = time.perf_counter()
            leaf, outputs = stage_forward(self.model, inputs)
            self.busy_s += time.perf_counter() - started
            if self.cfg.retained_graphs:
                self._graphs[microbatch_id] = (leaf, outputs)
                while len(self._graphs) > self.cfg.retained_graphs:
                    self._graphs.popitem(last=False)
        return outputs.detach()

    def backward(
        self, inputs: torch.Tensor, grad_outputs: torch.Tensor, *, step: int, microbatch_id: str
    ) -> torch.Tensor | None:
        """Accumulate parameter gradients for one microbatch; returns the gradient w.r.t. ``inputs``."""
        self._check(inputs, step)
        inputs, grad_outputs = inputs.to(self.device), grad_outputs.to(self.device)
        with self.lock:
            self._check_step(step)
            started = time.perf_counter()
            leaf, outputs = self._graph_for(microbatch_id, inputs)
            if grad_outputs.shape != outputs.shape or grad_outputs.dtype != outputs.dtype:
                raise StageInputError(
                    f"stage {self.index} expects grad_outputs of shape {list(outputs.shape)} {outputs.dtype}, "
                    f"got {list(grad_outputs.shape)} {grad_outputs.dtype}"
                )
            if not bool(torch.isfinite(grad_outputs).all()):
                raise StageInputError(f"stage {self.index} got non-finite grad_outputs; the request is rejected")
            outputs_backward(outputs, grad_outputs)
            return self._finish(leaf, inputs, started)

    def loss_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, step: int, microbatch_id: str
    ) -> tuple[float, torch.Tensor | None]:
        """Last stage: forward, loss, backward of ``loss * num_samples``; returns (mean loss, grad inputs)."""
        if not self.model.is_last:
            raise StageInputError(f"stage {self.index} is not the last stage; send targets to the last stage")
        self._check(inputs, step)
        if targets.dtype != torch.int64 or targets.shape != inputs.shape[:2]:
            raise StageInputError(
                f"targets must be int64 of shape {list(inputs.shape[:2])}, got {list(targets.shape)} {targets.dtype}"
            )
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with self.lock:
            self._check_step(step)
            started = time.perf_counter()
            leaf, loss = stage_loss(self.model, inputs, targets)
            if not bool(torch.isfinite(loss)):
                raise SwarmError(f"stage {self.index} computed a non-finite loss; the microbatch is dropped")
            loss_backward(loss, int(inputs.shape[0]))
            grad_inputs = self._finish(leaf, inputs, started)
        return float(loss.detach()), grad_inputs

    def evaluate(
        self, inputs: torch.Tensor, targets: torch.Tensor | None, *, step: int
    ) -> tuple[torch.Tensor | None, float | None]:
        """Forward only (evaluation): no graph, nothing accumulated, not counted as served work. Returns (outputs,
        None), or at the last stage with ``targets`` (None, mean loss). Needs the weights of ``step``: a step closed
        for averaging still has them."""
        self._check(inputs, step)
        if targets is not None and (not self.model.is_last or targets.shape != inputs.shape[:2]):
            raise StageInputError(f"stage {self.index}: targets go to the last stage, shaped like the inputs' [B, T]")
        inputs = inputs.to(self.device)
        with self.lock, torch.no_grad():
            if step != self.step:
                raise StaleStepError(f"stage {self.index} is at step {self.step}, the evaluation is for step {step}")
            training = self.model.training
            self.model.eval()
            try:
                outputs = self.model(inputs)
                if targets is None:
                    return outputs, None
                loss = self.model.loss(outputs, targets.to(device=self.device, dtype=torch.int64))
            finally:
                self.model.train(training)
        if not bool(torch.isfinite(loss)):
            raise SwarmError(f"stage {self.index} computed a non-finite evaluation loss")
        return None, float(loss)

    # ---- steps ---------------------------------------------------------------------------------------------

    def weights_digest_of(self, step: int) -> bytes:
        """The digest (`swarm.averaging.digests.weights_digest`) of the weights this server computed ``step``'s work
        with, or b"" when not known (``names_weights`` off, or the weights changed since)."""
        with self.lock:
            return self._digests.get(step, b"")

    def close_step(self) -> None:
        """Stop accepting work for the current step (averaging is about to start)."""
        with self.lock:
            self.accepting = False
            self._graphs.clear()

    def mean_gradients(self) -> list[torch.Tensor]:
        """The accumulated gradients divided by the samples served (zeros if none): what the all-reduce averages."""
        with self.lock:
            scale = 1.0 / self.samples if self.samples else 0.0
            return [(_grad(p).detach() * scale).cpu() for p in self.parameters()]

    def apply_step(
        self,
        gradients: list[torch.Tensor],
        *,
        new_step: int | None = None,
        replace: Mapping[int, torch.Tensor] = {},
        extra_state: dict[str, torch.Tensor] | None = None,
        optimize: bool = True,
    ) -> None:
        """Set ``gradients`` (the step's averaged mean), apply the optimizer, zero, open the next step.

        ``replace``: parameters (by index in ``parameters()``) overwritten before the update, in the same locked
        section, so weights still change only together with the step number (the tied matrix's re-tie, the
        local_sgd outer step); ``extra_state`` (when given) replaces `extra_state` in that section too.
        ``optimize=False``: the weights are ``replace``d and the step advances, with no optimizer update.
        """
        with self.lock:
            self._update(gradients, replace, optimize=optimize)
            if extra_state is not None:
                self.extra_state = extra_state
            self.step = self.step + 1 if new_step is None else new_step
            self._reset()

    def apply_updates(
        self,
        updates: Sequence[tuple[list[torch.Tensor], Mapping[int, torch.Tensor]]],
        *,
        new_step: int,
        extra_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`apply_step` for any number of (gradients, replace) updates in order, in one locked section, then open
        ``new_step`` (none: the step only advances). Delayed updates (`swarm.training.delayed`) apply two at a
        node's last step."""
        with self.lock:
            for gradients, replace in updates:
                self._update(gradients, replace, optimize=True)
            if extra_state is not None:
                self.extra_state = extra_state
            self.step = new_step
            self._reset()

    def _update(self, gradients: list[torch.Tensor], replace: Mapping[int, torch.Tensor], *, optimize: bool) -> None:
        """Under the lock: overwrite the ``replace``d parameters, set ``gradients``, apply the optimizer."""
        params = self.parameters()
        if len(gradients) != len(params):
            raise SwarmError(f"apply_step got {len(gradients)} gradients for {len(params)} parameters")
        for index, value in replace.items():
            expected = list(params[index].shape) if 0 <= index < len(params) else "no such parameter"
            if expected != list(value.shape):
                raise SwarmError(
                    f"apply_step: parameter {index} replaced by shape {list(value.shape)}, expected {expected}"
                )
        with torch.no_grad():
            for index, value in replace.items():
                params[index].copy_(value)
        for p, g in zip(params, gradients, strict=False):
            _grad(p).copy_(g)
        set_step_lr(self.optimizer, self.optimizer_cfg, self.step)
        if optimize:
            self.optimizer.step()

    def parameter_copy(self, index: int) -> torch.Tensor:
        """A copy of parameter ``index`` (as ``parameters()`` orders them), taken under the step lock."""
        with self.lock:
            return self.parameters()[index].detach().clone()

    def skip_to(self, step: int) -> None:
        """Drop this step's accumulation and serve ``step`` (after downloading state)."""
        with self.lock:
            self.step = step
            self._reset()

    def throughput(self) -> float:
        """Samples per second of compute this server has measured (0.0 before any work)."""
        return self.total_samples / self.busy_s if self.busy_s > 0 else 0.0

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = torch.zeros_like(p)

    # ---- helpers -------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._digests.clear()
        for p in self.parameters():
            _grad(p).zero_()
        self.samples = 0
        self.accepting = True
        self._graphs.clear()

    def _check(self, inputs: torch.Tensor, step: int) -> None:
        self.model.input_spec.check(inputs, stage=self.index, max_batch=self.cfg.max_batch)
        if step != self.step:
            raise StaleStepError(f"stage {self.index} is at step {self.step}, the request is for step {step}; retry")

    def _check_step(self, step: int) -> None:
        """Under the lock, before computing: the step is open (and its weights' digest taken)."""
        if step != self.step or not self.accepting:
            raise StaleStepError(f"stage {self.index} is not accepting work for step {step} (at {self.step}); retry")
        if self.names_weights and step not in self._digests:
            self._digests[step] = weights_digest(p for _, p in self.model.named_parameters())

    def _graph_for(self, microbatch_id: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._graphs.pop(microbatch_id, None)
        if cached is not None and cached[0].shape == inputs.shape and torch.equal(cached[0].detach(), inputs):
            return cached
        return stage_forward(self.model, inputs)

    def _finish(self, leaf: torch.Tensor, inputs: torch.Tensor, started: float) -> torch.Tensor | None:
        self.samples += int(inputs.shape[0])
        self.total_samples += int(inputs.shape[0])
        self.busy_s += time.perf_counter() - started
        return input_grad(leaf)
