"""``topk``: keep the ``k`` largest magnitudes of a gradient, with their indices packed.

``k = ceil(fraction * numel)`` (at least 1 for a non-empty tensor). The payload is the sorted indices,
packed little-endian in the fewest bytes that can address the tensor (1, 2, 4 or 8), padded to 8
bytes, then the kept values in the tensor's own dtype. Decoding puts the kept values back exactly
and zeros elsewhere; the indices must be strictly increasing and inside the tensor, or the payload is
refused. What ``topk`` drops is meant to be carried into the next round by an
:class:`swarm.compression.feedback.ErrorFeedback` residual the caller owns.
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
from swarm.errors import ConfigError

log = logging.getLogger(__name__)

_SAMPLE_MIN_NUMEL = 1 << 16
_SAMPLE_STRIDE = 64
_INDEX_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<i8"),
}


def index_width_bytes(numel: int) -> int:
    """The fewest bytes (1, 2, 4 or 8) that can hold every index of a tensor of ``numel`` elements."""
    for width in (1, 2, 4):
        if numel <= 1 << (8 * width):
            return width
    return 8


def top_indices(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values of a flat tensor (unsorted), exactly as ``torch.topk``.

    On large inputs a strided sample gives a threshold that keeps a little over ``k`` candidates, and
    ``topk`` runs on those only (exact, since every value below the threshold is below all candidates);
    if the sample misjudged and fewer than ``k`` pass, it falls back to ``topk`` on everything.
    """
    numel = magnitudes.numel()
    if numel >= _SAMPLE_MIN_NUMEL and k * 4 <= numel:
        sample = magnitudes[::_SAMPLE_STRIDE]
        keep = min(sample.numel(), int(sample.numel() * k / numel * 1.25) + 16)
        threshold = torch.topk(sample, keep, sorted=False).values.min()
        candidates = (magnitudes >= threshold).nonzero().squeeze(1)
        if k <= candidates.numel() < numel // 2:
            return candidates[torch.topk(magnitudes[candidates], k, sorted=False).indices]
    return torch.topk(magnitudes, k, sorted=False).indices


def _pad8(size_bytes: int) -> int:
    return -(-size_bytes // 8) * 8


@register_codec
class TopKCodec:
    """Top-k sparsification by magnitude; pair it with ErrorFeedback for gradients."""

    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = 5

    def __init__(self, fraction: float = 0.01) -> None:
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ConfigError(f"topk fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.alignment_numel = 1

    def num_kept(self, numel: int) -> int:
        """How many values a tensor of ``numel`` elements keeps."""
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self.fraction * numel)))

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Select the k largest magnitudes on the tensor's device; indices sorted and packed."""
        ensure_float(tensor, self.name)
        src = tensor.detach().reshape(-1)
        ensure_finite(src, "the tensor to encode")
        numel = src.numel()
        k = self.num_kept(numel)
        indices = torch.arange(numel, device=src.device) if k == numel else top_indices(src.abs(), k).sort().values
        values = src[indices].cpu()
        width = index_width_bytes(numel)
        packed = indices.cpu().numpy().astype(_INDEX_DTYPES[width])
        padding = bytes(_pad8(k * width) - k * width)
        return Encoded(
            codec=self.name,
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            params={"k": k},
            payload=(packed.data.cast("B"), padding, view_bytes(values)),
        )

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Check the indices (strictly increasing, in range), then scatter the values into zeros."""
        check_float_dtype(encoded.dtype, self.name)
        buf = checked_payload(self, encoded)
        numel, k = encoded.numel, param(encoded.params, "k", int, self.name)
        width = index_width_bytes(numel)
        dev = target_device(device)
        out = torch.zeros(numel, dtype=encoded.dtype, device=dev)
        if k == 0:
            return out.reshape(encoded.shape)
        packed = np.frombuffer(buf, dtype=_INDEX_DTYPES[width], count=k)
        indices = torch.from_numpy(packed.astype(np.int64))
        if indices[0].item() < 0 or indices[-1].item() >= numel or not bool((indices[1:] > indices[:-1]).all()):
            raise CorruptPayloadError(
                f"a topk payload has indices that are out of [0, {numel}) or not strictly increasing; drop it"
            )
        values = tensor_from_buffer(buf, encoded.dtype, offset_bytes=_pad8(k * width), count=k)
        ensure_finite(values, "a topk payload")
        out[indices.to(dev)] = values.to(dev)
        return out.reshape(encoded.shape)

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        k = param(params, "k", int, self.name)
        if not 0 <= k <= numel or (numel > 0 and k == 0):
            raise CorruptPayloadError(f"a topk header keeps k={k} of {numel} elements; drop it")
        return _pad8(k * index_width_bytes(numel)) + k * dtype.itemsize

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        return dtype.itemsize / (self.fraction * (dtype.itemsize + 4))
