"""``sparse``: a lossless codec for mostly-zero tensors, and the sender's side of a SparseLoCo outer sync.

`SparseCodec` sends the nonzero entries of a tensor exactly: their sorted indices (packed as ``topk`` packs them),
then either a codebook of their distinct values and one 1/2/4/8/16-bit code per entry, or, with more distinct values
than 65536, the values themselves. A tensor that is not sparse enough to gain goes dense (its raw values). Being
lossless, what an all-reduce owner sends back (the reduced part) decodes to the same bits on every member.

`topk_quantize` is what a sender puts through it: each tensor's ``fraction`` largest magnitudes, quantized to
``bits`` bits on ``2**bits`` uniform levels between ``-max`` and ``+max`` of those magnitudes (mid-rise: level ``q``
is ``((q + 0.5) * 2 / 2**bits - 1) * max``), zeros elsewhere. Every kept value is within ``max / 2**bits`` of its
input, and a tensor of them has at most ``2**bits`` distinct values, so `SparseCodec` codes it in ``bits`` bits a
value. Pair it with :class:`swarm.compression.feedback.ErrorFeedback` (what it drops is sent in a later round).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch

from swarm.compression.base import (
    Encoded,
    Params,
    check_float_dtype,
    checked_payload,
    ensure_finite,
    ensure_float,
    param,
    register_codec,
    target_device,
    tensor_from_buffer,
    view_bytes,
)
from swarm.compression.errors import CorruptPayloadError
from swarm.compression.topk import _INDEX_DTYPES, index_width_bytes, top_indices
from swarm.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CODEBOOK = 1 << 16
_CODE_BITS = (1, 2, 4, 8, 16)


def _pad8(size_bytes: int) -> int:
    return -(-size_bytes // 8) * 8


def _code_bits(codebook_size: int) -> int:
    """Bits per code for a codebook of this many values (0: no codebook, raw values)."""
    if codebook_size == 0:
        return 0
    need = max(1, math.ceil(math.log2(codebook_size)))
    return next(b for b in _CODE_BITS if b >= need)


def _pack_codes(codes: np.ndarray[Any, Any], bits: int) -> bytes:
    if bits == 16:
        return codes.astype("<u2").tobytes()
    codes = codes.astype(np.uint8)
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, :]
    return (padded.reshape(-1, per_byte) << shifts).sum(axis=1, dtype=np.uint8).tobytes()


def _unpack_codes(buf: memoryview, bits: int, count: int) -> np.ndarray[Any, Any]:
    if bits == 16:
        return np.frombuffer(buf, dtype="<u2", count=count).astype(np.int64)
    per_byte = 8 // bits
    raw = np.frombuffer(buf, dtype=np.uint8, count=-(-count // per_byte))
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, :]
    mask = np.uint8((1 << bits) - 1)
    return ((raw[:, None] >> shifts) & mask).reshape(-1)[:count].astype(np.int64)


def _sparse_size_bytes(numel: int, k: int, m: int, itemsize: int) -> int:
    bits = _code_bits(m)
    values = _pad8(m * itemsize) + _pad8(-(-k * bits // 8)) if m else k * itemsize
    return _pad8(k * index_width_bytes(numel)) + values


@register_codec
class SparseCodec:
    """Nonzero entries only, exactly (see the module doc); dense when that is smaller."""

    name: ClassVar[str] = "sparse"
    codec_id: ClassVar[int] = 6

    def __init__(self) -> None:
        self.alignment_numel = 1

    def encode(self, tensor: torch.Tensor) -> Encoded:
        ensure_float(tensor, self.name)
        src = tensor.detach().reshape(-1).cpu()
        ensure_finite(src, "the tensor to encode")
        numel, itemsize, shape = src.numel(), src.element_size(), tuple(tensor.shape)
        indices = src.nonzero().squeeze(1)
        values = src[indices]
        uniques, codes = torch.unique(values, return_inverse=True) if values.numel() else (values, indices)
        k, m = int(indices.numel()), int(uniques.numel())
        m = m if m <= MAX_CODEBOOK else 0
        if _sparse_size_bytes(numel, k, m, itemsize) >= numel * itemsize:
            params = {"dense": 1, "k": 0, "m": 0}
            return Encoded(codec=self.name, dtype=tensor.dtype, shape=shape, params=params, payload=(view_bytes(src),))
        width = index_width_bytes(numel)
        packed = indices.numpy().astype(_INDEX_DTYPES[width]).tobytes()
        parts: list[Any] = [packed, bytes(_pad8(k * width) - k * width)]
        if m:
            book = view_bytes(uniques)
            code_bytes = _pack_codes(codes.numpy(), _code_bits(m))
            parts += [book, bytes(_pad8(m * itemsize) - m * itemsize), code_bytes]
            parts.append(bytes(_pad8(len(code_bytes)) - len(code_bytes)))
        else:
            parts.append(view_bytes(values))
        return Encoded(
            codec=self.name, dtype=tensor.dtype, shape=shape, params={"dense": 0, "k": k, "m": m}, payload=tuple(parts)
        )

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Check every index (strictly increasing, in range) and code (inside the codebook), then scatter."""
        check_float_dtype(encoded.dtype, self.name)
        buf = checked_payload(self, encoded)
        numel, dtype, dev = encoded.numel, encoded.dtype, target_device(device)
        if param(encoded.params, "dense", int, self.name):
            values = tensor_from_buffer(buf, dtype, offset_bytes=0, count=numel)
            ensure_finite(values, "a sparse payload")
            return values.to(dev, copy=True).reshape(encoded.shape)
        k, m = param(encoded.params, "k", int, self.name), param(encoded.params, "m", int, self.name)
        out = torch.zeros(numel, dtype=dtype, device=dev)
        if k == 0:
            return out.reshape(encoded.shape)
        width = index_width_bytes(numel)
        indices = torch.from_numpy(np.frombuffer(buf, dtype=_INDEX_DTYPES[width], count=k).astype(np.int64))
        if indices[0].item() < 0 or indices[-1].item() >= numel or not bool((indices[1:] > indices[:-1]).all()):
            raise CorruptPayloadError(f"a sparse payload has indices out of [0, {numel}) or not increasing; drop it")
        offset = _pad8(k * width)
        if m:
            book = tensor_from_buffer(buf, dtype, offset_bytes=offset, count=m)
            codes = _unpack_codes(buf[offset + _pad8(m * dtype.itemsize) :], _code_bits(m), k)
            if int(codes.max()) >= m:
                raise CorruptPayloadError(f"a sparse payload has a code outside its codebook of {m}; drop it")
            values = book[torch.from_numpy(codes)]
        else:
            values = tensor_from_buffer(buf, dtype, offset_bytes=offset, count=k)
        ensure_finite(values, "a sparse payload")
        out[indices.to(dev)] = values.to(dev)
        return out.reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        if param(params, "dense", int, self.name):
            return numel * dtype.itemsize
        k, m = param(params, "k", int, self.name), param(params, "m", int, self.name)
        if not 0 <= k <= numel or not 0 <= m <= min(k, MAX_CODEBOOK):
            raise CorruptPayloadError(f"a sparse header keeps k={k} of {numel} with a codebook of {m}; drop it")
        return _sparse_size_bytes(numel, k, m, dtype.itemsize)

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return 1.0  # lossless: it gains only what the input's zeros allow


def topk_quantize(tensor: torch.Tensor, *, fraction: float, bits: int) -> torch.Tensor:
    """``tensor``'s ``ceil(fraction * numel)`` largest magnitudes (at least one) quantized to ``bits`` bits on
    uniform mid-rise levels over ``[-max, max]``, zeros elsewhere (a new float32 tensor of its shape)."""
    if not 0.0 < fraction <= 1.0 or not 1 <= bits <= 8:
        raise ConfigError(f"topk_quantize needs fraction in (0, 1] and bits in [1, 8], got {fraction!r}, {bits!r}")
    flat = tensor.detach().reshape(-1).float()
    out = torch.zeros_like(flat)
    numel = flat.numel()
    if numel == 0:
        return out.reshape(tensor.shape)
    k = min(numel, max(1, math.ceil(fraction * numel)))
    indices = top_indices(flat.abs(), k)
    kept = flat[indices]
    scale = float(kept.abs().max())
    if scale == 0.0:
        return out.reshape(tensor.shape)
    levels = 1 << bits
    codes = torch.clamp(torch.floor((kept / scale + 1.0) * (levels / 2)), 0, levels - 1)
    out[indices] = ((codes + 0.5) * (2.0 / levels) - 1.0) * scale
    return out.reshape(tensor.shape)
