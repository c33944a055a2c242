"""How parts travel: a small codec Protocol, and its implementation on top of ``compression/``."""

from __future__ import annotations

from typing import Protocol

import torch

from compression import decode_chunk_into, get_codec, serialize_tensor
from swarm.errors import ConfigError, SwarmError


class PartCodec(Protocol):
    """Encodes one part (a 1-D float32 tensor) to bytes, and decodes bytes into a part's slot.

    ``decode_into`` writes exactly ``out.numel()`` values into ``out``, or raises CodecError (bad bytes, wrong
    size, NaN/Inf) and leaves ``out`` unchanged.

    ``inline`` is True when both are plain byte copies (about 50 us per 512 KiB part), cheap enough to run on
    the event loop; otherwise the all-reduce runs them in a worker thread.
    """

    name: str
    inline: bool

    def encode(self, values: torch.Tensor) -> bytes: ...

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

    def encode(self, values: torch.Tensor) -> bytes:
        return serialize_tensor(values.reshape(-1), self._codec)

    def decode_into(self, data: bytes, out: torch.Tensor) -> None:
        decode_chunk_into(data, out)
