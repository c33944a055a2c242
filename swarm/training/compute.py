"""A stage's compute, shared by serving and replay: forward, loss and backward of one microbatch.

`swarm.training.stage_server.StageServer` serves with these functions and the validator's
`swarm.training.validator.StageReplayer` recomputes with them, so that a replay of a step's work with that step's
weights computes exactly what the server computed. They hold no lock and check no request: the server validates
its inputs and serialises its compute around them. The last stage back-propagates ``loss * num_samples`` (sums
over samples; the server divides by the samples served when the step closes). The run's precision is applied by
the model itself (`StageModel.forward`: bf16 autocast, bf16 activations), so these functions, `PipelineModel` and
the single-process loop all compute in it alike; the backward follows the forward's dtypes.
"""

from __future__ import annotations

import torch

from swarm.model.stages import StageModel


def input_leaf(inputs: torch.Tensor) -> torch.Tensor:
    """The tensor the stage runs on: floating inputs become a leaf that collects the gradient w.r.t. them."""
    return inputs.detach().requires_grad_(True) if inputs.is_floating_point() else inputs


def stage_forward(model: StageModel, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, outputs): the stage's outputs for ``inputs``, with the autograd graph kept for a backward."""
    leaf = input_leaf(inputs)
    with torch.enable_grad():
        return leaf, model(leaf)


def stage_loss(model: StageModel, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last stage: (leaf, mean loss) of ``inputs`` against ``targets``, with the graph kept for `loss_backward`."""
    leaf = input_leaf(inputs)
    with torch.enable_grad():
        return leaf, model.loss(model(leaf), targets)


def loss_backward(loss: torch.Tensor, num_samples: int) -> None:
    """Accumulate the gradients of ``loss * num_samples`` (a sum over the microbatch's samples)."""
    (loss * num_samples).backward()


def outputs_backward(outputs: torch.Tensor, grad_outputs: torch.Tensor) -> None:
    """Accumulate the gradients of ``outputs`` given the next stage's gradient w.r.t. them."""
    outputs.backward(grad_outputs)


def input_grad(leaf: torch.Tensor) -> torch.Tensor | None:
    """The gradient w.r.t. the inputs after a backward (None for integer inputs: token ids have none)."""
    return leaf.grad.detach() if leaf.is_floating_point() and leaf.grad is not None else None
