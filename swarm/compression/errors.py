"""Codec-specific subclasses of :class:`swarm.errors.CodecError`.

Every error raised while encoding or decoding a tensor derives from ``CodecError`` so a caller that
serves peers can catch one class, drop the request and keep serving.
"""

from __future__ import annotations

from swarm.errors import CodecError


class UnknownCodecError(CodecError, LookupError):
    """A codec name or wire id is not registered."""

    code = "unknown_codec"


class NonFiniteError(CodecError):
    """A float tensor (or a scale in a payload) holds NaN or Inf; no codec encodes or decodes those."""

    code = "non_finite"


class PayloadSizeError(CodecError):
    """A payload is shorter or longer than its header says."""

    code = "payload_size"


class LimitExceededError(CodecError):
    """A header announces a tensor larger than the receiver's limits (checked before allocating)."""

    code = "limit_exceeded"


class CorruptPayloadError(CodecError):
    """A payload is well sized but its content is invalid (bad index, bad scale, bad parameters)."""

    code = "corrupt_payload"


class UnsupportedDtypeError(CodecError, TypeError):
    """A codec was asked to encode a dtype it does not handle."""

    code = "unsupported_dtype"
