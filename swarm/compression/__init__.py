"""Tensor codecs, the tensor wire format, codec choice by role, and the activation bottleneck.

>>> from swarm.compression import get_codec, serialize_tensor, deserialize_tensor
>>> data = serialize_tensor(tensor, get_codec("blockwise8"))
>>> tensor = deserialize_tensor(data, max_numel=1 << 24)
"""

from swarm.compression import bf16, blockwise8, fp16, none, sparse, topk, uniform8  # noqa: F401  (they register)
from swarm.compression.base import Codec, Encoded, codec_by_id, codec_names, get_codec, register_codec
from swarm.compression.errors import (
    CorruptPayloadError,
    LimitExceededError,
    NonFiniteError,
    PayloadSizeError,
    UnknownCodecError,
    UnsupportedDtypeError,
)
from swarm.compression.feedback import ErrorFeedback
from swarm.compression.policy import CodecPolicy, Role
from swarm.compression.wire import (
    ChunkAssembler,
    DecodedChunk,
    decode_chunk,
    decode_chunk_into,
    decode_chunk_values,
    decode_chunks,
    deserialize_tensor,
    iter_encode_chunks,
    serialize_tensor,
    serialize_tensor_parts,
)

__all__ = [
    "ChunkAssembler",
    "Codec",
    "CodecPolicy",
    "CorruptPayloadError",
    "DecodedChunk",
    "Encoded",
    "ErrorFeedback",
    "LimitExceededError",
    "NonFiniteError",
    "PayloadSizeError",
    "Role",
    "UnknownCodecError",
    "UnsupportedDtypeError",
    "codec_by_id",
    "codec_names",
    "decode_chunk",
    "decode_chunk_into",
    "decode_chunk_values",
    "decode_chunks",
    "deserialize_tensor",
    "get_codec",
    "iter_encode_chunks",
    "register_codec",
    "serialize_tensor",
    "serialize_tensor_parts",
]
