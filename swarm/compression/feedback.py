"""Error feedback: what a lossy gradient codec drops this round is added to the next round's input.

The caller owns one :class:`ErrorFeedback` per gradient tensor (a residual buffer of its shape).
Over many rounds the sum of what was transmitted tracks the sum of the true inputs: after round ``t``,
``sum(inputs) - sum(transmitted) == residual``, which stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from swarm.compression.base import Codec
from swarm.compression.wire import decode_chunk, iter_encode_chunks
from swarm.errors import ConfigError

log = logging.getLogger(__name__)


class ErrorFeedback:
    """A residual buffer for one tensor: ``compensate`` before encoding, ``record`` what was sent."""

    def __init__(self, like: torch.Tensor) -> None:
        if not like.is_floating_point():
            raise ConfigError(f"ErrorFeedback needs a floating tensor to shape its residual, got {like.dtype}")
        self.residual = torch.zeros_like(like, dtype=torch.float32)

    def compensate(self, tensor: torch.Tensor) -> torch.Tensor:
        """This round's input plus what earlier rounds dropped (a new float32 tensor)."""
        if tensor.shape != self.residual.shape:
            raise ConfigError(
                f"ErrorFeedback was made for shape {tuple(self.residual.shape)}, got {tuple(tensor.shape)}"
            )
        return self.residual.add(tensor.detach())

    def record(self, compensated: torch.Tensor, transmitted: torch.Tensor) -> None:
        """Keep what was dropped: ``residual = compensated - transmitted``."""
        torch.sub(compensated, transmitted.to(self.residual.device, torch.float32), out=self.residual)

    def encode_chunks(self, tensor: torch.Tensor, codec: Codec, *, chunk_size_bytes: int) -> Iterator[bytes]:
        """Encode ``tensor`` with feedback; yields wire chunks and updates the residual as it goes."""
        compensated = self.compensate(tensor)
        transmitted = torch.empty_like(compensated)
        flat = transmitted.view(-1)
        for chunk in iter_encode_chunks(compensated, codec, chunk_size_bytes=chunk_size_bytes):
            part = decode_chunk(chunk, device=flat.device)
            flat[part.offset : part.offset + part.values.numel()] = part.values
            yield chunk
        self.record(compensated, transmitted)
