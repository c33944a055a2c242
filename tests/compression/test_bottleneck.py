"""The activation bottleneck trains with the model and shrinks the bytes between stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.compression import get_codec, serialize_tensor
from swarm.compression.bottleneck import BottleneckDown, BottleneckUp, bottleneck_dim, insert_bottlenecks
from swarm.errors import ConfigError


def toy_stages(hidden: int) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(8, hidden), nn.GELU()), nn.Sequential(nn.Linear(hidden, 1))]


def test_pair_trains_and_bytes_shrink() -> None:
    torch.manual_seed(0)
    hidden, ratio = 64, 16
    stages = insert_bottlenecks(toy_stages(hidden), hidden, ratio)
    assert isinstance(stages[0][-1], BottleneckDown) and isinstance(stages[1][0], BottleneckUp)
    params = [p for stage in stages for p in stage.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(512, 8, generator=gen)
    target = (inputs[:, :2].sum(1, keepdim=True)).sin()
    losses = []
    for _ in range(300):
        boundary = stages[0](inputs)
        loss = nn.functional.mse_loss(stages[1](boundary), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    assert boundary.shape == (512, hidden // ratio)
    plain = toy_stages(hidden)[0](inputs)
    codec = get_codec("none")
    assert len(serialize_tensor(plain, codec)) > (ratio - 1) * len(serialize_tensor(boundary, codec))


def test_three_stages_and_identity_cases() -> None:
    stages = [nn.Identity(), nn.Identity(), nn.Identity()]
    wrapped = insert_bottlenecks(stages, 32, 4)
    x = torch.randn(2, 5, 32)
    mid = wrapped[1](wrapped[0](x))
    assert mid.shape == (2, 5, 8)
    assert wrapped[2](mid).shape == (2, 5, 32)
    assert insert_bottlenecks(stages, 32, 1) == stages
    assert insert_bottlenecks(stages[:1], 32, 4) == stages[:1]


@pytest.mark.parametrize(("hidden", "ratio"), [(0, 1), (32, 0), (32, 33), (32, 2.0)])
def test_bad_config(hidden: int, ratio: int) -> None:
    with pytest.raises(ConfigError):
        bottleneck_dim(hidden, ratio)
    with pytest.raises(ConfigError):
        BottleneckDown(hidden, ratio)
