"""How parts travel: a small codec Protocol, and its implementation on top of ``compression/``."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from swarm.compression import decode_chunk_into, decode_chunk_values, get_codec, serialize_tensor_parts
from swarm.errors import ConfigError, SwarmError


class PartCodec(Protocol):
    """Encodes one part (a 1-D float32 tensor) to bytes and back.

    ``encode`` returns the message as buffers to send in order (one DATA frame, not joined first); they may be
    views of the part's memory, so they are sent before the part changes. ``decode`` returns the part's float32
    values, possibly a read-only view of ``data`` (the receiver copies what it keeps); ``decode_into`` writes
    them into ``out``. Both raise CodecError on bad bytes, a wrong size or NaN/Inf, and ``decode_into`` then
    leaves ``out`` unchanged.

    ``inline`` is True when both are plain byte copies (about 50 us per 512 KiB part), cheap enough to run on
    the event loop; otherwise the all-reduce runs them in a worker thread.
    """

    name: str
    inline: bool

    def encode(self, values: torch.Tensor) -> tuple[Any, ...]: ...

    def decode(self, data: bytes, numel: int) -> torch.Tensor: ...

    def decode_into(self, data: bytes, out: torch.Tensor) -> None: ...


class CompressionPartCodec:
    """A :class:`PartCodec` using the named ``compression`` codec; decoded parts are checked for size.

    ``compression`` itself refuses NaN/Inf on encode and decode (``NonFiniteError``, a CodecError).
    """

    def __init__(self, name: str) -> None:
        try:
            self._codec = get_codec(name)
        except (SwarmError, KeyError, ValueError) as e:
            raise ConfigError(f"codec: unknown all-reduce codec {name!r} ({e})") from None
        self.name = name
        self.inline = name == "none"

    def encode(self, values: torch.Tensor) -> tuple[Any, ...]:
        return serialize_tensor_parts(values.reshape(-1), self._codec)

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        return decode_chunk_values(data, numel).to(torch.float32)

    def decode_into(self, data: bytes, out: torch.Tensor) -> None:
        decode_chunk_into(data, out)
