"""``fp16``: cast to IEEE half precision (relative error <= 2**-11 per element in the normal range)."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from swarm.compression.base import (
    Encoded,
    Params,
    check_float_dtype,
    checked_payload,
    ensure_finite,
    ensure_float,
    register_codec,
    target_device,
    tensor_from_buffer,
    view_bytes,
)
from swarm.compression.errors import NonFiniteError

log = logging.getLogger(__name__)


class CastCodec:
    """Shared body of the 16-bit cast codecs; subclasses set ``name``, ``codec_id``, ``wire_dtype``."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    wire_dtype: ClassVar[torch.dtype]

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Cast on the tensor's device, then hand the 16-bit bytes over (no copy beyond the cast)."""
        ensure_float(tensor, self.name)
        src = tensor.detach().reshape(-1)
        cast = src.to(self.wire_dtype)
        try:
            ensure_finite(cast, f"the {self.name} cast")
        except NonFiniteError:
            ensure_finite(src, "the tensor to encode")
            raise NonFiniteError(
                f"the tensor has finite values beyond the {self.name} range "
                f"(+-{torch.finfo(self.wire_dtype).max:g}); use 'bf16' or 'none' for this role"
            ) from None
        return Encoded(
            codec=self.name, dtype=tensor.dtype, shape=tuple(tensor.shape), payload=(view_bytes(cast.cpu()),)
        )

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Check the 16-bit values are finite, then widen them into a new tensor."""
        check_float_dtype(encoded.dtype, self.name)
        buf = checked_payload(self, encoded)
        cast = tensor_from_buffer(buf, self.wire_dtype, offset_bytes=0, count=encoded.numel)
        ensure_finite(cast, f"a {self.name} payload")
        dev = target_device(device)
        if dev.type != "cpu":
            cast = cast.to(dev)
        return cast.to(encoded.dtype, copy=True).reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        return numel * self.wire_dtype.itemsize

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return dtype.itemsize / self.wire_dtype.itemsize


@register_codec
class Float16Codec(CastCodec):
    """IEEE half: 10-bit mantissa, range +-65504 (a larger finite value is refused, not clamped)."""

    name: ClassVar[str] = "fp16"
    codec_id: ClassVar[int] = 1
    wire_dtype: ClassVar[torch.dtype] = torch.float16
