"""Activation bottleneck: a learned down-projection at the end of a stage, an up-projection at the start
of the next, trained with the model. With ``ratio`` r, a boundary sends ``hidden_dim // r`` numbers per
token instead of ``hidden_dim`` (IOTA reports 64x-128x fewer bytes between stages at little loss).

The model builder calls :func:`insert_bottlenecks` on the list of stage modules when the run config
asks for a bottleneck; each stage's output (``[..., hidden_dim]``) then crosses the wire at
``bottleneck_dim(hidden_dim, ratio)`` features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from swarm.errors import ConfigError

log = logging.getLogger(__name__)


def bottleneck_dim(hidden_dim: int, ratio: int) -> int:
    """Features per token on the wire for a boundary of ``hidden_dim`` squeezed ``ratio`` times."""
    if not (isinstance(hidden_dim, int) and hidden_dim > 0):
        raise ConfigError(f"bottleneck hidden_dim must be a positive int, got {hidden_dim!r}")
    if not (isinstance(ratio, int) and 1 <= ratio <= hidden_dim):
        raise ConfigError(f"bottleneck ratio must be an int in [1, hidden_dim={hidden_dim}], got {ratio!r}")
    return hidden_dim // ratio


class BottleneckDown(nn.Module):
    """End of a stage: LayerNorm then Linear ``dim -> dim // ratio``."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.dim, self.ratio = dim, ratio
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, bottleneck_dim(dim, ratio))
        nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))


class BottleneckUp(nn.Module):
    """Start of the next stage: Linear ``dim // ratio -> dim``."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.dim, self.ratio = dim, ratio
        self.proj = nn.Linear(bottleneck_dim(dim, ratio), dim)
        nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, compressed: torch.Tensor) -> torch.Tensor:
        return self.proj(compressed)


def insert_bottlenecks(stage_modules: Sequence[nn.Module], hidden_dim: int, ratio: int) -> list[nn.Module]:
    """Wrap stages so every boundary carries ``hidden_dim // ratio`` features.

    Stage ``i < last`` becomes ``Sequential(stage_i, BottleneckDown)`` and stage ``i > 0`` becomes
    ``Sequential(BottleneckUp, stage_i)``. ``ratio == 1`` or a single stage returns the stages unchanged.
    The new modules are ordinary parameters of their stage: the optimizer and averaging see them.
    """
    bottleneck_dim(hidden_dim, ratio)
    stages = list(stage_modules)
    if ratio == 1 or len(stages) < 2:
        return stages
    wrapped: list[nn.Module] = []
    for index, stage in enumerate(stages):
        parts: list[nn.Module] = []
        if index > 0:
            parts.append(BottleneckUp(hidden_dim, ratio))
        parts.append(stage)
        if index < len(stages) - 1:
            parts.append(BottleneckDown(hidden_dim, ratio))
        wrapped.append(nn.Sequential(*parts))
    return wrapped
