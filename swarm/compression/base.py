"""The codec Protocol, the encoded form every codec produces, the registry, and shared checks.

A codec turns a tensor into an :class:`Encoded` (codec parameters plus payload bytes) and back.
Codecs work on the flat tensor; the shape rides along in ``Encoded`` and in the wire header
(``compression/wire.py``). Decoding is driven only by the parameters in the ``Encoded``, so any
instance of a codec class decodes what any other instance of it encoded.

NaN/Inf policy (the same for every codec): a floating tensor holding NaN or Inf is refused on encode,
and a payload whose values or scales are NaN or Inf is refused on decode, with
:class:`~swarm.compression.errors.NonFiniteError`. A lossy codec whose target range cannot hold a finite
input (``fp16`` of 1e6) refuses it the same way instead of returning Inf.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from swarm.compression.errors import (
    CorruptPayloadError,
    NonFiniteError,
    PayloadSizeError,
    UnknownCodecError,
    UnsupportedDtypeError,
)

log = logging.getLogger(__name__)

Params = Mapping[str, int | float]
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """One encoded tensor: what a codec made of it, before (or after) the wire header."""

    codec: str
    dtype: torch.dtype  # the dtype the decoded tensor will have
    shape: tuple[int, ...]
    params: Params = field(default_factory=dict)
    payload: tuple[Any, ...] = ()  # bytes-like parts (bytes, memoryview), concatenated on the wire

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def payload_size_bytes(self) -> int:
        return sum(memoryview(part).nbytes for part in self.payload)

    def payload_view(self) -> memoryview:
        """The payload as one flat byte memoryview (no copy when it is a single part)."""
        if len(self.payload) == 1:
            return memoryview(self.payload[0]).cast("B")
        return memoryview(b"".join(self.payload))


@runtime_checkable
class Codec(Protocol):
    """A tensor codec. ``name``/``codec_id`` identify it in configs and on the wire.

    A codec may also offer ``decode_view(encoded)``: the CPU values without a copy, as a read-only view of the
    payload; :func:`swarm.compression.wire.decode_chunk_values` uses it when present (``none`` does).
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    alignment_numel: int  # chunked encoding cuts the flat tensor at multiples of this

    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Encode a tensor (any shape, CPU or CUDA); the payload parts are CPU bytes-like."""
        ...

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode to a new tensor of ``encoded.dtype`` and ``encoded.shape`` on ``device`` (CPU if None)."""
        ...

    def payload_size_bytes(self, *, numel: int, dtype: torch.dtype, params: Params) -> int:
        """The exact payload size for these parameters; CodecError if the parameters are invalid."""
        ...

    def estimated_ratio(self, dtype: torch.dtype) -> float:
        """Raw bytes / encoded bytes for a large tensor of ``dtype`` (4.0 for 8 bits of fp32)."""
        ...


_REGISTRY: dict[str, type[Codec]] = {}
_BY_ID: dict[int, type[Codec]] = {}
C = TypeVar("C", bound=Codec)


def register_codec(cls: type[C]) -> type[C]:
    """Class decorator: make a codec class reachable by its ``name`` and wire ``codec_id``."""
    name, codec_id = cls.name, cls.codec_id
    if _REGISTRY.get(name, cls) is not cls or _BY_ID.get(codec_id, cls) is not cls:
        raise ValueError(f"codec name {name!r} or id {codec_id} is already registered by another class")
    _REGISTRY[name] = cls
    _BY_ID[codec_id] = cls
    return cls


def codec_names() -> tuple[str, ...]:
    """Names of all registered codecs."""
    _load_builtin_codecs()
    return tuple(sorted(_REGISTRY))


def get_codec(name: str, **params: Any) -> Codec:
    """A codec instance by name (``none``, ``fp16``, ``bf16``, ``blockwise8``, ``uniform8``, ``topk``)."""
    _load_builtin_codecs()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {name!r}; use one of {', '.join(sorted(_REGISTRY))}") from None
    return cls(**params)


def codec_by_id(codec_id: int) -> Codec:
    """A default instance of the codec with this wire id (decoding needs no encoder settings)."""
    _load_builtin_codecs()
    try:
        cls = _BY_ID[codec_id]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec id {codec_id} in a tensor header; the sender runs a codec this node does not know"
        ) from None
    return cls()


def _load_builtin_codecs() -> None:
    if len(_REGISTRY) < 7:
        from swarm.compression import bf16, blockwise8, fp16, none, sparse, topk, uniform8  # noqa: F401  (they register)


def ensure_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if a floating tensor holds NaN or Inf.

    One sum first (about 5x cheaper than a min/max pass): NaN and Inf propagate into it, so a finite sum proves
    every value finite. Only a non-finite sum (a NaN, an Inf, or finite values that overflow) takes the exact
    min/max pass.
    """
    if tensor.numel() == 0 or tensor.dtype not in FLOAT_DTYPES:
        return
    flat = tensor.reshape(-1)
    if math.isfinite(flat.sum().item()):
        return
    lo, hi = torch.aminmax(flat)  # NaN propagates into both
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise NonFiniteError(
            f"{what} holds NaN or Inf; swarm never sends non-finite values: fix the computation "
            "(lower the learning rate, clip gradients) or skip this step"
        )


def ensure_float(tensor: torch.Tensor, codec_name: str) -> None:
    """Raise UnsupportedDtypeError unless the tensor is a floating dtype a lossy codec can encode."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"codec {codec_name!r} encodes float16/bfloat16/float32/float64 tensors, not {tensor.dtype}; use 'none'"
        )


def check_float_dtype(dtype: torch.dtype, codec_name: str) -> None:
    """On decode: a lossy codec's header must name a floating dtype."""
    if dtype not in FLOAT_DTYPES:
        raise CorruptPayloadError(f"codec {codec_name!r} cannot produce dtype {dtype}; the header is corrupt")


def param(params: Params, key: str, kind: type, codec_name: str) -> Any:
    """Read one codec parameter from a (peer-supplied) mapping, checking its type."""
    value = params.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CorruptPayloadError(
            f"codec {codec_name!r} needs parameter {key!r} of type {kind.__name__}, got {value!r}"
        )
    return value


def view_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's storage as a flat byte memoryview, without a copy when it is contiguous."""
    flat = tensor.detach().reshape(-1).contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def tensor_from_buffer(buf: memoryview, dtype: torch.dtype, *, offset_bytes: int, count: int) -> torch.Tensor:
    """A read-only-safe tensor view of ``count`` items of ``buf`` (callers must not write into it)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if not buf.readonly:  # torch warns about read-only buffers only; catch_warnings costs ~10 us a call
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset_bytes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset_bytes)


def target_device(device: torch.device | str | None) -> torch.device:
    """The device a decoded tensor lands on (CPU when None)."""
    return torch.device("cpu") if device is None else torch.device(device)


def checked_payload(codec: Codec, encoded: Encoded) -> memoryview:
    """The payload as one memoryview, after checking its size against the codec's parameters."""
    if encoded.codec != codec.name:
        raise CorruptPayloadError(f"codec {codec.name!r} was handed a payload of codec {encoded.codec!r}")
    expected = codec.payload_size_bytes(numel=encoded.numel, dtype=encoded.dtype, params=encoded.params)
    buf = encoded.payload_view()
    if buf.nbytes != expected:
        raise PayloadSizeError(
            f"{codec.name} payload is {buf.nbytes} bytes but its header implies {expected}; "
            "the sender is buggy or the data was truncated: drop it"
        )
    return buf
