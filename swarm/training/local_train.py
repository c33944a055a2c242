"""The plain single-process training loop: the baseline a swarm run is compared against.

Same model (all stages chained), same global batch per step (``target_batch_size`` in microbatches of
``microbatch_size``), same optimizer, same data source; gradients are the sample-weighted mean over the step,
exactly what a swarm step computes after its all-reduce. With ``[precision] compute = "bf16"`` each stage of the
chain computes under bf16 autocast with bf16 activations between stages, as the swarm's stage servers do
(`StageModel.forward`); the parameters and the optimizer state stay float32. With ``eval.every_steps`` set, it
computes the validation loss at the same steps, on the same held-out microbatches, as the swarm's evaluator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from swarm.run.config import RunConfig
from swarm.data import ShardedData
from swarm.model.optim import make_optimizer, set_step_lr
from swarm.model.stages import PipelineModel, build_stages


@dataclass(kw_only=True)
class LocalRunResult:
    """Mean loss per step, samples seen, wall time and tokens/s of a single-process run."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    loss_floor: float | None = None
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss, as the swarm evaluates


def train_local(
    cfg: RunConfig, *, steps: int, shard_key: bytes = b"single-process"
) -> tuple[PipelineModel, LocalRunResult]:
    """Train ``steps`` optimizer steps in this process; returns the model and the per-step mean losses."""
    model = PipelineModel(build_stages(cfg))
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    data = ShardedData(cfg, shard_key)
    result = LocalRunResult(loss_floor=data.loss_floor)
    target, micro = cfg.batch.target_batch_size, cfg.batch.microbatch_size
    started = time.perf_counter()
    every = cfg.eval.every_steps
    for step in range(steps):
        if every > 0 and step % every == 0:
            result.eval_losses[step] = evaluate(model, data, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        seen, loss_sum, index = 0, 0.0, 0
        while seen < target:
            batch = data.microbatch(step, index, min(micro, target - seen))
            loss = model.loss(batch.inputs, batch.targets)
            (loss * batch.num_samples / target).backward()
            loss_sum += float(loss.detach()) * batch.num_samples
            seen += batch.num_samples
            index += 1
        set_step_lr(optimizer, cfg.optimizer, step)
        optimizer.step()
        result.losses.append(loss_sum / seen)
        result.samples += seen
    result.elapsed_s = time.perf_counter() - started
    if every > 0:
        result.eval_losses[steps] = evaluate(model, data, cfg, steps)
    result.tokens_per_s = result.samples * cfg.model.seq_len / max(result.elapsed_s, 1e-9)
    return model, result


@torch.no_grad()
def evaluate(model: PipelineModel, data: ShardedData, cfg: RunConfig, step: int) -> float:
    """The validation loss of the weights after ``step`` updates: the mean over samples of the same ``eval.batches``
    held-out microbatches the swarm's evaluator sends through the stages (`swarm.training.evaluating`)."""
    total, samples = 0.0, 0
    for index in range(cfg.eval.batches):
        batch = data.eval_microbatch(step, index)
        total += float(model.loss(batch.inputs, batch.targets)) * batch.num_samples
        samples += batch.num_samples
    return total / max(samples, 1)
