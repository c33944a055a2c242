"""``uniform8``: per-tensor affine 8-bit quantization (one scale and one midpoint per tensor or chunk).

``scale = (max - min) / 255``, ``code = round((x - mid) / scale + 127.5)``, ``x' = (code - 127.5) * scale + mid``.
Bound: every element is within ``scale / 2`` of its input (plus float32 rounding, and the rounding of a
16-bit output dtype). Good for well-spread data (activations); an outlier widens ``scale`` for the whole
tensor, so use ``blockwise8`` for heavy-tailed data.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch

from swarm.compression.base import (
    Encoded,
    Params,
    check_float_dtype,
    checked_payload,
    ensure_float,
    param,
    register_codec,
    target_device,
    tensor_from_buffer,
    view_bytes,
)
from swarm.compression.errors import NonFiniteError

log = logging.getLogger(__name__)

_LEVELS = 255
_CENTER = _LEVELS / 2
_FAST_RANGE = 1e37  # below this, (code * scale) cannot overflow float32
_TINY = torch.finfo(torch.float32).tiny  # a range under 255 * this decodes as its midpoint


@register_codec
class Uniform8Codec:
    """Per-tensor scale and offset, 8 bits per element."""

    name: ClassVar[str] = "uniform8"
    codec_id: ClassVar[int] = 4

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """One min/max pass (which also refuses NaN/Inf), then one fused-ish affine pass to uint8."""
        ensure_float(tensor, self.name)
        x = tensor.detach().reshape(-1)
        if x.dtype != torch.float32:
            x = x.float()
        shape = tuple(tensor.shape)
        if x.numel() == 0:
            params = {"mid": 0.0, "scale": 0.0}
            return Encoded(codec=self.name, dtype=tensor.dtype, shape=shape, params=params, payload=(b"",))
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = lo_t.item(), hi_t.item()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError("the tensor to encode holds NaN or Inf; swarm never sends non-finite values")
        mid = (lo + hi) / 2
        scale = (hi - lo) / _LEVELS
        scale_f32 = float(torch.tensor(scale, dtype=torch.float32))
        if scale_f32 >= _TINY:
            scale = scale_f32
            codes = x.sub(mid).mul_(1.0 / scale).add_(_CENTER).round_().clamp_(0, _LEVELS).to(torch.uint8)
        else:
            scale = 0.0
            codes = torch.full_like(x, 127, dtype=torch.uint8)
        return Encoded(
            codec=self.name,
            dtype=tensor.dtype,
            shape=shape,
            params={"mid": mid, "scale": scale},
            payload=(view_bytes(codes.cpu()),),
        )

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Check the scale and midpoint, then one affine pass into a new tensor."""
        check_float_dtype(encoded.dtype, self.name)
        buf = checked_payload(self, encoded)
        mid = param(encoded.params, "mid", float, self.name)
        scale = param(encoded.params, "scale", float, self.name)
        limit = torch.finfo(encoded.dtype).max
        if not (math.isfinite(mid) and math.isfinite(scale) and scale >= 0) or abs(mid) + _CENTER * scale > limit:
            raise NonFiniteError(
                f"a uniform8 payload has scale {scale!r} and midpoint {mid!r}, which do not give finite "
                f"{encoded.dtype} values; drop it"
            )
        dev = target_device(device)
        codes = tensor_from_buffer(buf, torch.uint8, offset_bytes=0, count=encoded.numel).to(dev)
        if _LEVELS * scale < _FAST_RANGE:
            out = codes.to(torch.float32).mul_(scale).add_(mid - _CENTER * scale)
        else:
            out = codes.to(torch.float64).sub_(_CENTER).mul_(scale).add_(mid)
        return out.to(encoded.dtype).reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        return numel

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return float(dtype.itemsize)
