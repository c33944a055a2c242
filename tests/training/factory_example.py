"""A user model factory for the tests: ``model.factory = "tests.training.factory_example:make"``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn


def make(run: Any) -> tuple[list[nn.Module], Any]:
    m = run.model
    first = nn.Sequential(nn.Embedding(m.vocab_size, m.d_model), nn.Tanh())
    last = nn.Linear(m.d_model, m.vocab_size)
    return [first, last], lambda logits, targets: F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )
