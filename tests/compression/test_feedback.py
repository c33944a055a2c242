"""Error feedback: the sum of decoded topk updates converges to the sum of the inputs."""

from __future__ import annotations

import pytest
import torch

from swarm.compression import ErrorFeedback, decode_chunks, deserialize_tensor, get_codec, serialize_tensor
from swarm.errors import ConfigError


def run_rounds(num_rounds: int, *, feedback: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    codec = get_codec("topk", fraction=0.05)
    ef = ErrorFeedback(torch.zeros(2000))
    sum_in, sum_out = torch.zeros(2000), torch.zeros(2000)
    for _ in range(num_rounds):
        grad = torch.randn(2000, generator=gen) * 0.1 + 0.02  # a small consistent signal under noise
        sum_in += grad
        if feedback:
            sent = ef.compensate(grad)
            decoded = deserialize_tensor(serialize_tensor(sent, codec))
            ef.record(sent, decoded)
        else:
            decoded = deserialize_tensor(serialize_tensor(grad, codec))
        sum_out += decoded
    return sum_in, sum_out


def test_sums_converge_with_feedback_and_not_without() -> None:
    sum_in, sum_out = run_rounds(400, feedback=True)
    assert float((sum_in - sum_out).norm() / sum_in.norm()) < 0.1
    sum_in, sum_out_plain = run_rounds(400, feedback=False)
    assert float((sum_in - sum_out_plain).norm() / sum_in.norm()) > 0.5


def test_relative_gap_shrinks_with_rounds() -> None:
    gaps = []
    for rounds in (50, 400):
        sum_in, sum_out = run_rounds(rounds, feedback=True)
        gaps.append(float((sum_in - sum_out).norm() / sum_in.norm()))
    assert gaps[1] < gaps[0] / 2


def test_residual_is_exactly_what_was_dropped() -> None:
    ef = ErrorFeedback(torch.zeros(4, 8))
    grad = torch.randn(4, 8, generator=torch.Generator().manual_seed(12))
    chunks = list(ef.encode_chunks(grad, get_codec("topk", fraction=0.25), chunk_size_bytes=16))
    assert len(chunks) > 1
    sent = decode_chunks(chunks)
    assert torch.equal(ef.residual + sent, grad)
    assert int((ef.residual == 0).sum()) == int((sent != 0).sum())


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        ErrorFeedback(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ConfigError, match="shape"):
        ErrorFeedback(torch.zeros(3)).compensate(torch.zeros(4))
