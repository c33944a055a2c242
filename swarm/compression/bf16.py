"""``bf16``: cast to bfloat16 (fp32's range, relative error <= 2**-8 per element)."""

from __future__ import annotations

from typing import ClassVar

import torch

from swarm.compression.base import register_codec
from swarm.compression.fp16 import CastCodec


@register_codec
class BFloat16Codec(CastCodec):
    """bfloat16: 7-bit mantissa, the range of float32 (never overflows from fp32/fp16/bf16)."""

    name: ClassVar[str] = "bf16"
    codec_id: ClassVar[int] = 2
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
