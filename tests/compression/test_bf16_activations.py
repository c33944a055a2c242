"""bf16 activations (``[precision] compute = "bf16"``) go through every float codec as they are: decoded as
bfloat16, never upcast on the wire (at most 2 bytes a value), exact where the codec is lossless for them."""

from __future__ import annotations

import pytest
import torch

from swarm.compression import (
    ChunkAssembler,
    CodecPolicy,
    Role,
    codec_names,
    deserialize_tensor,
    get_codec,
    iter_encode_chunks,
    serialize_tensor,
)

SHAPE = (8, 16, 64)  # microbatch, sequence, width: one stage's activations
HEADER_BYTES = 256  # generous bound on a tensor's wire header


def activations(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("name", codec_names())
def test_every_codec_round_trips_bf16_activations_without_upcasting(name: str) -> None:
    x = activations()
    data = serialize_tensor(x, get_codec(name))
    y = deserialize_tensor(data)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert len(data) <= x.numel() * x.element_size() + HEADER_BYTES  # never 4 bytes a value
    if name in ("none", "bf16", "fp16"):  # fp16 holds every bf16 value of this range exactly
        assert torch.equal(y.view(torch.int16), x.view(torch.int16))
    elif name == "topk":  # the kept values are exact, the others zero
        kept = y != 0
        assert kept.any() and torch.equal(y[kept], x[kept])
    else:  # 8-bit codecs: within their quantization error
        assert (y.float() - x.float()).abs().max() <= 0.05 * x.float().abs().max()


def test_none_sends_half_the_bytes_of_fp32() -> None:
    x = activations()
    half, full = (len(serialize_tensor(t, get_codec("none"))) for t in (x, x.float()))
    assert half - HEADER_BYTES < full / 2 < half + HEADER_BYTES


def test_chunked_bf16_streams_reassemble_exactly() -> None:
    x = activations(1)
    assembler = ChunkAssembler()
    chunks = list(iter_encode_chunks(x, get_codec("none"), chunk_size_bytes=4096))
    assert len(chunks) > 1
    for chunk in reversed(chunks):  # any order
        assembler.add(chunk)
    y = assembler.result()
    assert y.dtype == torch.bfloat16 and torch.equal(y.reshape(x.shape), x)


@pytest.mark.parametrize("codec", ["none", "fp16", "uniform8"])
def test_the_activation_policy_keeps_bf16(codec: str) -> None:
    policy = CodecPolicy(activations=codec, activation_grads=codec)
    x = activations(2)
    for role in (Role.ACTIVATIONS, Role.ACTIVATION_GRADS):
        y = deserialize_tensor(serialize_tensor(x, policy.codec_for(role, x)))
        assert y.dtype == torch.bfloat16
