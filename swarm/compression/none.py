"""``none``: the tensor's own bytes, exact for every dtype."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from swarm.compression.base import (
    Encoded,
    Params,
    checked_payload,
    ensure_finite,
    register_codec,
    target_device,
    tensor_from_buffer,
    view_bytes,
)

log = logging.getLogger(__name__)


@register_codec
class NoneCodec:
    """No compression: bit-exact for any dtype (floats must still be finite, see ``swarm.compression.base``)."""

    name: ClassVar[str] = "none"
    codec_id: ClassVar[int] = 0

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """The tensor's bytes (no copy for a contiguous CPU tensor)."""
        ensure_finite(tensor, "the tensor to encode")
        flat = tensor.detach().reshape(-1).cpu()
        return Encoded(codec=self.name, dtype=tensor.dtype, shape=tuple(tensor.shape), payload=(view_bytes(flat),))

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """A new tensor (one copy out of the payload buffer)."""
        buf = checked_payload(self, encoded)
        flat = tensor_from_buffer(buf, encoded.dtype, offset_bytes=0, count=encoded.numel)
        ensure_finite(flat, "a 'none' payload")
        return flat.to(target_device(device), copy=True).reshape(encoded.shape)

    def decode_view(self, encoded: Encoded) -> torch.Tensor:
        """The payload's values without a copy: a read-only view of the payload buffer (checked for NaN/Inf)."""
        buf = checked_payload(self, encoded)
        flat = tensor_from_buffer(buf, encoded.dtype, offset_bytes=0, count=encoded.numel)
        ensure_finite(flat, "a 'none' payload")
        return flat.reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        return numel * dtype.itemsize

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return 1.0
