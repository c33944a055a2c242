"""``none``: the tensor's own bytes, exact for every dtype.

An integer tensor whose values all fit a narrower unsigned or signed type (token ids: int64 values below 65536) goes
in that type (``narrow``: its width in bytes, 1, 2 or 4) and decodes to its own dtype again, bit-exact: the targets of
a microbatch cost a quarter of their int64 bytes, which matters once the activations beside them are compressed.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch

from swarm.compression.base import (
    Encoded,
    Params,
    checked_payload,
    ensure_finite,
    param,
    register_codec,
    target_device,
    tensor_from_buffer,
    view_bytes,
)
from swarm.compression.errors import CorruptPayloadError

log = logging.getLogger(__name__)

_INT_DTYPES = frozenset({torch.int16, torch.int32, torch.int64})
_NARROW: dict[int, str] = {1: "<u1", 2: "<u2", 4: "<i4"}  # width in bytes -> the wire's type


def _narrow_width(flat: torch.Tensor) -> int:
    """The narrowest ``_NARROW`` width holding every value of an integer tensor, if narrower than its own (else 0)."""
    if flat.dtype not in _INT_DTYPES or flat.numel() == 0:
        return 0
    lo, hi = int(flat.min()), int(flat.max())
    for width, kind in _NARROW.items():
        info = np.iinfo(kind)
        if width < flat.element_size() and info.min <= lo and hi <= info.max:
            return width
    return 0


def _width(params: Params, dtype: torch.dtype) -> int:
    """A header's ``narrow`` (0: the dtype's own bytes), checked against the dtype."""
    if "narrow" not in params:
        return 0
    width = param(params, "narrow", int, "none")
    if width not in _NARROW or dtype not in _INT_DTYPES or width >= dtype.itemsize:
        raise CorruptPayloadError(f"a 'none' header narrows {dtype} to {width!r} bytes; drop it")
    return int(width)


@register_codec
class NoneCodec:
    """No compression: bit-exact for any dtype (floats must still be finite, see ``swarm.compression.base``)."""

    name: ClassVar[str] = "none"
    codec_id: ClassVar[int] = 0

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """The tensor's bytes (no copy for a contiguous CPU tensor); an integer tensor's in a narrower type if its
        values fit one."""
        ensure_finite(tensor, "the tensor to encode")
        flat = tensor.detach().reshape(-1).cpu()
        shape, width = tuple(tensor.shape), _narrow_width(flat)
        if width:
            packed = flat.numpy().astype(_NARROW[width]).tobytes()
            return Encoded(
                codec=self.name, dtype=tensor.dtype, shape=shape, params={"narrow": width}, payload=(packed,)
            )
        return Encoded(codec=self.name, dtype=tensor.dtype, shape=shape, payload=(view_bytes(flat),))

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """A new tensor (one copy out of the payload buffer)."""
        buf = checked_payload(self, encoded)
        width = _width(encoded.params, encoded.dtype)
        if width:
            wide = np.frombuffer(buf, dtype=_NARROW[width], count=encoded.numel).astype(np.int64)
            return torch.from_numpy(wide).to(encoded.dtype).to(target_device(device)).reshape(encoded.shape)
        flat = tensor_from_buffer(buf, encoded.dtype, offset_bytes=0, count=encoded.numel)
        ensure_finite(flat, "a 'none' payload")
        return flat.to(target_device(device), copy=True).reshape(encoded.shape)

    def decode_view(self, encoded: Encoded) -> torch.Tensor:
        """The payload's values without a copy: a read-only view of the payload buffer (checked for NaN/Inf); a
        narrowed integer payload is widened (a copy)."""
        if _width(encoded.params, encoded.dtype):
            return self.decode(encoded)
        buf = checked_payload(self, encoded)
        flat = tensor_from_buffer(buf, encoded.dtype, offset_bytes=0, count=encoded.numel)
        ensure_finite(flat, "a 'none' payload")
        return flat.reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        return numel * (_width(params, dtype) or dtype.itemsize)

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return 1.0
