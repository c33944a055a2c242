"""The optimizer of a run, built the same way by the single-process loop and by every stage server."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from swarm.run.config import OptimizerConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with the run's settings; the warmup is applied by `set_step_lr`."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def set_step_lr(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, step: int) -> None:
    """Linear warmup over ``warmup_steps``, then the constant ``lr``."""
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * scale
