"""The tensor wire format: a self-describing header, then the codec's payload.

Layout (little-endian)::

    0   2s  magic b"SW"            16  Q  offset: first element of this chunk in the flat tensor
    2   B   version (1)             24  Q  numel: elements in this chunk
    3   B   codec id                32  Q  payload size in bytes
    4   B   dtype code              40  ndim x Q: the whole tensor's shape
    5   B   ndim                    ..  params: a msgpack map {str: int | float}
    6   H   params size in bytes    ..  zero padding to a multiple of 8, then the payload

A whole tensor is one chunk (offset 0, numel = its size); ``iter_encode_chunks`` cuts a large tensor
into independent chunks, each decodable alone, so a receiver can reduce chunk by chunk. Decoding
checks every size against the header and the caller's limits before it allocates anything.
"""

from __future__ import annotations

import bisect
import logging
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from swarm.compression.base import Codec, Encoded, codec_by_id
from swarm.compression.errors import CorruptPayloadError, LimitExceededError, PayloadSizeError, UnsupportedDtypeError
from swarm.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"SW"
VERSION = 1
MAX_NDIM = 16
MAX_PARAMS_SIZE_BYTES = 1024
DEFAULT_MAX_NUMEL = 1 << 28  # 256 Mi elements
DEFAULT_MAX_SIZE_BYTES = 1 << 30  # 1 GiB decoded
DEFAULT_CHUNK_SIZE_BYTES = 512 * 1024

_FIXED = struct.Struct("<2sBBBBHQQQ")
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
)  # fmt: skip
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}


@dataclass(frozen=True, kw_only=True)
class DecodedChunk:
    """One decoded chunk: ``values`` (flat) belong at ``offset`` in a tensor of ``shape``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    values: torch.Tensor

    @property
    def total_numel(self) -> int:
        return math.prod(self.shape)


def _pack(encoded: Encoded, codec: Codec, *, shape: tuple[int, ...], offset: int) -> bytes:
    return b"".join(_pack_parts(encoded, codec, shape=shape, offset=offset))


def _pack_parts(encoded: Encoded, codec: Codec, *, shape: tuple[int, ...], offset: int) -> tuple[Any, ...]:
    """The message as buffers to concatenate: the header, then the codec's payload parts (not copied)."""
    dtype_code = _DTYPE_CODES.get(encoded.dtype)
    if dtype_code is None:
        raise UnsupportedDtypeError(f"dtype {encoded.dtype} has no wire code; send one of {list(_DTYPE_CODES)}")
    if len(shape) > MAX_NDIM:
        raise CorruptPayloadError(f"a tensor of {len(shape)} dimensions exceeds the wire limit of {MAX_NDIM}")
    params = msgpack.packb(dict(encoded.params), use_bin_type=True)
    fixed = _FIXED.pack(
        MAGIC, VERSION, codec.codec_id, dtype_code, len(shape), len(params),
        offset, encoded.numel, encoded.payload_size_bytes,
    )  # fmt: skip
    head_size = _FIXED.size + 8 * len(shape) + len(params)
    padding = bytes(-head_size % 8)
    return (b"".join((fixed, struct.pack(f"<{len(shape)}Q", *shape), params, padding)), *encoded.payload)


def serialize_tensor(tensor: torch.Tensor, codec: Codec) -> bytes:
    """Encode a whole tensor (any device) into one self-describing message."""
    encoded = codec.encode(tensor)
    return _pack(encoded, codec, shape=tuple(tensor.shape), offset=0)


def serialize_tensor_parts(tensor: torch.Tensor, codec: Codec) -> tuple[Any, ...]:
    """The message of :func:`serialize_tensor` as buffers whose concatenation it is, without joining them.

    With ``none`` the payload is a view of the tensor's own memory (no copy): hand the buffers to something that
    consumes them (a transport that encrypts them) before the tensor changes.
    """
    encoded = codec.encode(tensor)
    return _pack_parts(encoded, codec, shape=tuple(tensor.shape), offset=0)


def chunk_numel(codec: Codec, dtype: torch.dtype, chunk_size_bytes: int) -> int:
    """Elements per chunk so that each chunk's payload is about ``chunk_size_bytes``."""
    if not (isinstance(chunk_size_bytes, int) and chunk_size_bytes > 0):
        raise ConfigError(f"chunk_size_bytes must be a positive int, got {chunk_size_bytes!r}")
    numel = int(chunk_size_bytes * codec.estimated_ratio(dtype) / dtype.itemsize)
    align = codec.alignment_numel
    return max(align, numel // align * align)


def iter_encode_chunks(
    tensor: torch.Tensor, codec: Codec, chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
) -> Iterator[bytes]:
    """Encode a tensor as independent chunks (each with its own header and offset), lazily."""
    flat = tensor.detach().reshape(-1)
    shape, step = tuple(tensor.shape), chunk_numel(codec, tensor.dtype, chunk_size_bytes)
    numel = flat.numel()
    for start in range(0, max(numel, 1), step):
        part = flat[start : start + step]
        yield _pack(codec.encode(part), codec, shape=shape, offset=start)


def _read_params(raw: memoryview) -> dict[str, int | float]:
    try:
        params = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=64, max_map_len=16)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise CorruptPayloadError(f"tensor header parameters are not valid msgpack ({type(e).__name__})") from None
    if not isinstance(params, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in params.values()
    ):
        raise CorruptPayloadError("tensor header parameters must be a map of names to numbers")
    return params


def decode_chunk(
    data: bytes | bytearray | memoryview,
    *,
    max_numel: int = DEFAULT_MAX_NUMEL,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    device: torch.device | str | None = None,
) -> DecodedChunk:
    """Check one message against its header and the limits, then decode its values (flat)."""
    codec, encoded, shape, offset = _parse_chunk(data, max_numel=max_numel, max_size_bytes=max_size_bytes)
    values = codec.decode(encoded, device=device)
    return DecodedChunk(shape=shape, dtype=encoded.dtype, offset=offset, values=values)


def decode_chunk_values(data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
    """The flat values of a one-chunk message of exactly ``numel`` elements, copied only if the codec must.

    The header and sizes are checked as in :func:`decode_chunk`, with ``numel`` as the limit. A codec with a
    ``decode_view(encoded)`` method (``none``) returns a read-only view of ``data``: valid while ``data`` lives
    and is unchanged, never to be written into. Raises CodecError on a bad message.
    """
    codec, encoded, _, _ = _parse_chunk(data, max_numel=numel, max_size_bytes=DEFAULT_MAX_SIZE_BYTES)
    if encoded.numel != numel:
        raise PayloadSizeError(f"chunk has {encoded.numel} values, expected {numel}")
    decode_view = getattr(codec, "decode_view", None)
    values = decode_view(encoded) if decode_view is not None else codec.decode(encoded)
    return values.reshape(-1)


def decode_chunk_into(data: bytes | bytearray | memoryview, out: torch.Tensor) -> None:
    """Decode one message whose values are exactly ``out.numel()`` elements into ``out`` (cast to its dtype).

    With ``none`` this is one copy out of ``data``. Raises CodecError and leaves ``out`` unchanged when the
    message is bad (every check runs before the first write).
    """
    out.reshape(-1).copy_(decode_chunk_values(data, out.numel()))


def _parse_chunk(
    data: bytes | bytearray | memoryview, *, max_numel: int, max_size_bytes: int
) -> tuple[Codec, Encoded, tuple[int, ...], int]:
    """Check one message against its header and the limits: its codec, payload, whole shape and offset."""
    view = memoryview(data).cast("B")
    if view.nbytes < _FIXED.size:
        raise PayloadSizeError(f"a tensor message of {view.nbytes} bytes is shorter than its {_FIXED.size}-byte header")
    magic, version, codec_id, dtype_code, ndim, params_size, offset, numel, payload_size = _FIXED.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise CorruptPayloadError(f"not a swarm tensor message (magic {magic!r}, version {version}); drop it")
    if dtype_code >= len(_DTYPES) or ndim > MAX_NDIM or params_size > MAX_PARAMS_SIZE_BYTES:
        raise CorruptPayloadError(
            f"tensor header has dtype code {dtype_code}, {ndim} dims, {params_size} bytes of parameters: corrupt"
        )
    codec = codec_by_id(codec_id)
    head_size = _FIXED.size + 8 * ndim + params_size
    if view.nbytes < head_size:
        raise PayloadSizeError(f"a tensor message of {view.nbytes} bytes ends inside its {head_size}-byte header")
    shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED.size)
    dtype = _DTYPES[dtype_code]
    total = math.prod(shape)  # Python ints: no overflow
    if total > max_numel or total * dtype.itemsize > max_size_bytes:
        raise LimitExceededError(
            f"tensor of shape {shape} ({dtype}) exceeds the limits of {max_numel} elements / {max_size_bytes} "
            "bytes; raise the limit if this size is expected"
        )
    if offset + numel > total:
        raise CorruptPayloadError(f"chunk [{offset}, {offset + numel}) lies outside a tensor of {total} elements")
    params = _read_params(view[_FIXED.size + 8 * ndim : head_size])
    start = head_size + (-head_size % 8)
    expected = codec.payload_size_bytes(numel=numel, dtype=dtype, params=params)
    if payload_size != expected or view.nbytes != start + payload_size:
        raise PayloadSizeError(
            f"{codec.name} chunk of {numel} elements needs a {expected}-byte payload; the header says "
            f"{payload_size} and {view.nbytes - start} bytes came: truncated or corrupt, drop it"
        )
    encoded = Encoded(codec=codec.name, dtype=dtype, shape=(numel,), params=params, payload=(view[start:],))
    return codec, encoded, tuple(shape), offset


def deserialize_tensor(
    data: bytes | bytearray | memoryview,
    *,
    max_numel: int = DEFAULT_MAX_NUMEL,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode a message made by ``serialize_tensor`` (one chunk covering the whole tensor)."""
    chunk = decode_chunk(data, max_numel=max_numel, max_size_bytes=max_size_bytes, device=device)
    if chunk.offset != 0 or chunk.values.numel() != chunk.total_numel:
        raise CorruptPayloadError(
            f"expected a whole tensor but got a chunk [{chunk.offset}, {chunk.offset + chunk.values.numel()}) "
            f"of {chunk.total_numel} elements; use decode_chunks for chunked streams"
        )
    return chunk.values.reshape(chunk.shape)


class ChunkAssembler:
    """Reassembles a tensor from its chunks as they arrive (any order); checks overlap and coverage."""

    def __init__(
        self,
        *,
        max_numel: int = DEFAULT_MAX_NUMEL,
        max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
        device: torch.device | str | None = None,
    ) -> None:
        self._max_numel, self._max_size_bytes, self._device = max_numel, max_size_bytes, device
        self._out: torch.Tensor | None = None
        self._spans: list[tuple[int, int]] = []
        self._covered = 0

    def add(self, data: bytes | bytearray | memoryview) -> DecodedChunk:
        """Decode one chunk and place it; CodecError if it disagrees with earlier chunks or overlaps them."""
        chunk = decode_chunk(data, max_numel=self._max_numel, max_size_bytes=self._max_size_bytes, device=self._device)
        if self._out is None:
            self._out = torch.empty(chunk.total_numel, dtype=chunk.dtype, device=chunk.values.device)
            self._shape = chunk.shape
        elif chunk.shape != self._shape or chunk.dtype != self._out.dtype:
            raise CorruptPayloadError(
                f"chunk of a {chunk.dtype} tensor {chunk.shape} in a stream of a {self._out.dtype} tensor {self._shape}"
            )
        begin, end = chunk.offset, chunk.offset + chunk.values.numel()
        if begin < end:
            at = bisect.bisect_left(self._spans, (begin, end))
            if (at > 0 and self._spans[at - 1][1] > begin) or (at < len(self._spans) and self._spans[at][0] < end):
                raise CorruptPayloadError(f"chunk [{begin}, {end}) overlaps a chunk already received; drop the stream")
            self._spans.insert(at, (begin, end))
            self._out[begin:end] = chunk.values
            self._covered += end - begin
        return chunk

    def result(self) -> torch.Tensor:
        """The whole tensor; CodecError if no chunk came or some elements are missing."""
        if self._out is None:
            raise PayloadSizeError("a chunk stream ended before its first chunk")
        if self._covered != self._out.numel():
            raise PayloadSizeError(
                f"a chunk stream ended with {self._covered} of {self._out.numel()} elements; it was cut short"
            )
        return self._out.reshape(self._shape)


def decode_chunks(
    chunks: Iterable[bytes | bytearray | memoryview],
    *,
    max_numel: int = DEFAULT_MAX_NUMEL,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode a complete set of chunks (from ``iter_encode_chunks``) into one tensor."""
    assembler = ChunkAssembler(max_numel=max_numel, max_size_bytes=max_size_bytes, device=device)
    for data in chunks:
        assembler.add(data)
    return assembler.result()
