"""The Codec Protocol is an extension point: a third-party codec registers and round-trips the wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch

from swarm.compression import Codec, Encoded, decode_chunks, get_codec, iter_encode_chunks, register_codec
from swarm.compression import base
from swarm.compression.base import Params, checked_payload, tensor_from_buffer, view_bytes


class NegateCodec:
    """A toy codec: float32 payload of the negated values."""

    name: ClassVar[str] = "negate-test"
    codec_id: ClassVar[int] = 200

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        neg = tensor.detach().reshape(-1).float().neg()
        return Encoded(codec=self.name, dtype=tensor.dtype, shape=tuple(tensor.shape), payload=(view_bytes(neg),))

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        buf = checked_payload(self, encoded)
        values = tensor_from_buffer(buf, torch.float32, offset_bytes=0, count=encoded.numel)
        return values.neg().to(encoded.dtype).reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        return 4 * numel

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return dtype.itemsize / 4


@pytest.fixture
def negate_registered() -> Iterator[None]:
    register_codec(NegateCodec)
    try:
        yield
    finally:
        del base._REGISTRY[NegateCodec.name], base._BY_ID[NegateCodec.codec_id]


def test_custom_codec_round_trip(negate_registered: None) -> None:
    codec = get_codec("negate-test")
    assert isinstance(codec, Codec)
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_chunks(iter_encode_chunks(x, codec, chunk_size_bytes=512)), x)


def test_name_or_id_clash_is_refused(negate_registered: None) -> None:
    class Clash(NegateCodec):
        codec_id: ClassVar[int] = 201

    with pytest.raises(ValueError, match="already registered"):
        register_codec(Clash)
