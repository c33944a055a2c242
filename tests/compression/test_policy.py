"""CodecPolicy: codec choice by role and size, validated config."""

from __future__ import annotations

import pytest
import torch

from swarm.compression import CodecPolicy, Role
from swarm.errors import ConfigError


def test_defaults_by_role() -> None:
    policy = CodecPolicy()
    big = torch.zeros(1 << 17)
    assert policy.codec_for(Role.ACTIVATIONS, big).name == "fp16"
    assert policy.codec_for("activation_grads", big).name == "fp16"
    assert policy.codec_for(Role.ALLREDUCE, big).name == "blockwise8"
    assert policy.codec_for(Role.STATE, big).name == "none"


def test_small_and_integer_tensors_go_uncompressed() -> None:
    policy = CodecPolicy(activations="uniform8", min_compress_numel=100)
    assert policy.codec_for(Role.ACTIVATIONS, torch.zeros(99)).name == "none"
    assert policy.codec_for(Role.ACTIVATIONS, torch.zeros(100)).name == "uniform8"
    assert policy.codec_for(Role.ACTIVATIONS, torch.zeros(1000, dtype=torch.int64)).name == "none"


def test_codec_parameters_flow_through() -> None:
    policy = CodecPolicy(allreduce="topk", topk_fraction=0.1, min_compress_numel=0)
    codec = policy.codec_for(Role.ALLREDUCE, torch.zeros(10))
    assert codec.name == "topk" and codec.fraction == 0.1  # type: ignore[attr-defined]
    policy = CodecPolicy(blockwise8_blocksize=256, min_compress_numel=0)
    assert policy.codec_for(Role.ALLREDUCE, torch.zeros(10)).blocksize == 256  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"activations": "zip"}, "activations"),
        ({"allreduce": "fp8"}, "allreduce"),
        ({"state": "topk"}, "state"),
        ({"activations": "topk"}, "activations"),
        ({"min_compress_numel": -1}, "min_compress_numel"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"blockwise8_blocksize": 1000}, "blockwise8_blocksize"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CodecPolicy(**kwargs)


def test_from_dict() -> None:
    assert CodecPolicy.from_dict({"allreduce": "uniform8"}).allreduce == "uniform8"
    with pytest.raises(ConfigError, match="allredcue"):
        CodecPolicy.from_dict({"allredcue": "uniform8"})
    with pytest.raises(ConfigError, match="role"):
        CodecPolicy().codec_for("weights", torch.zeros(1))


def test_policy_is_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        CodecPolicy("fp16")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        CodecPolicy().state = "fp16"  # type: ignore[misc]
