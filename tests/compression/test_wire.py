"""The wire format: headers, chunking, limits, and every kind of bad input."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from swarm.compression import (
    ChunkAssembler,
    decode_chunk,
    decode_chunk_into,
    decode_chunk_values,
    decode_chunks,
    deserialize_tensor,
    get_codec,
    iter_encode_chunks,
    serialize_tensor,
    serialize_tensor_parts,
)
from swarm.compression.errors import (
    CorruptPayloadError,
    LimitExceededError,
    NonFiniteError,
    PayloadSizeError,
    UnknownCodecError,
    UnsupportedDtypeError,
)
from swarm.compression.wire import _FIXED
from swarm.errors import CodecError, ConfigError

CODECS = ("none", "fp16", "bf16", "blockwise8", "uniform8", "topk")


def gaussian(numel: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def header_fields(data: bytes) -> list:
    return list(_FIXED.unpack_from(data))


def with_fields(data: bytes, **changes: int) -> bytes:
    """Rewrite fields of the fixed header (names as in compression/wire.py)."""
    names = ["magic", "version", "codec", "dtype", "ndim", "params_size", "offset", "numel", "payload_size"]
    fields = header_fields(data)
    for name, value in changes.items():
        fields[names.index(name)] = value
    return _FIXED.pack(*fields) + data[_FIXED.size :]


def params_span(data: bytes) -> tuple[int, int]:
    fields = header_fields(data)
    start = _FIXED.size + 8 * fields[4]
    return start, start + fields[5]


@pytest.mark.parametrize("name", CODECS)
def test_chunks_are_independent_and_reassemble(name: str) -> None:
    x = gaussian(50_000).reshape(250, 200)
    codec = get_codec(name)
    chunks = list(iter_encode_chunks(x, codec, chunk_size_bytes=1024 if name == "topk" else 8192))
    assert len(chunks) > 1
    whole = deserialize_tensor(serialize_tensor(x, codec)) if name != "topk" else None
    covered = 0
    for data in chunks:  # each chunk decodes alone, at its own offset
        part = decode_chunk(data)
        assert part.shape == (250, 200)
        if whole is not None and name != "uniform8":  # uniform8 scales per chunk, the others per element/block
            flat = whole.reshape(-1)[part.offset : part.offset + part.values.numel()]
            assert torch.equal(part.values, flat)
        covered += part.values.numel()
    assert covered == x.numel()
    y = decode_chunks(reversed(chunks))  # any order
    assert y.shape == x.shape
    if name != "topk":
        assert float((y - x).norm() / x.norm()) < 0.015


def test_chunk_size_bounds_payload() -> None:
    x = gaussian(1 << 17)
    for name in ("none", "fp16", "blockwise8", "uniform8"):
        for data in iter_encode_chunks(x, get_codec(name), chunk_size_bytes=16384):
            assert len(data) <= 16384 + 256


def test_empty_tensor_is_one_chunk() -> None:
    chunks = list(iter_encode_chunks(torch.empty(0, 3), get_codec("fp16")))
    assert len(chunks) == 1
    assert decode_chunks(chunks).shape == (0, 3)


def test_decodes_memoryview_and_bytearray() -> None:
    x = gaussian(1000)
    data = serialize_tensor(x, get_codec("none"))
    for form in (memoryview(data), bytearray(data), memoryview(b"xx" + data)[2:]):
        assert torch.equal(deserialize_tensor(form), x)


def test_decoded_tensor_owns_its_memory() -> None:
    data = bytearray(serialize_tensor(gaussian(100), get_codec("none")))
    y = deserialize_tensor(data)
    data[-400:] = bytes(400)
    assert bool((y != 0).all())
    y.add_(1.0)  # writable


@pytest.mark.parametrize("name", CODECS)
def test_payload_shorter_or_longer_than_header(name: str) -> None:
    data = serialize_tensor(gaussian(5000), get_codec(name))
    for bad in (data[:-1], data[: len(data) // 2], data + b"\0", data + bytes(1000)):
        with pytest.raises(PayloadSizeError):
            deserialize_tensor(bad)
    fields = header_fields(data)
    with pytest.raises(PayloadSizeError):
        deserialize_tensor(with_fields(data, payload_size=fields[8] + 8) + bytes(8))


def test_truncated_header() -> None:
    data = serialize_tensor(gaussian(10).reshape(2, 5), get_codec("none"))
    for cut in (0, 5, _FIXED.size, _FIXED.size + 9):
        with pytest.raises(PayloadSizeError):
            deserialize_tensor(data[:cut])


def test_unknown_codec_id_and_bad_magic() -> None:
    data = serialize_tensor(gaussian(10), get_codec("none"))
    with pytest.raises(UnknownCodecError):
        deserialize_tensor(with_fields(data, codec=250))
    with pytest.raises(CorruptPayloadError):
        deserialize_tensor(with_fields(data, magic=b"XX"))
    with pytest.raises(CorruptPayloadError):
        deserialize_tensor(with_fields(data, dtype=99))


def test_shape_product_overflow_is_refused_before_allocating() -> None:
    data = serialize_tensor(gaussian(4).reshape(2, 2), get_codec("none"))
    huge = struct.pack("<2Q", 1 << 63, 1 << 63)
    forged = data[: _FIXED.size] + huge + data[_FIXED.size + 16 :]
    with pytest.raises(LimitExceededError):
        deserialize_tensor(forged)


def test_limits() -> None:
    x = gaussian(4096)
    data = serialize_tensor(x, get_codec("fp16"))
    with pytest.raises(LimitExceededError):
        deserialize_tensor(data, max_numel=4095)
    with pytest.raises(LimitExceededError):
        deserialize_tensor(data, max_size_bytes=4096 * 4 - 1)
    assert deserialize_tensor(data, max_numel=4096, max_size_bytes=4096 * 4).numel() == 4096
    stream = list(iter_encode_chunks(x, get_codec("fp16"), chunk_size_bytes=1024))
    with pytest.raises(LimitExceededError):
        decode_chunks(stream, max_numel=100)


def test_chunk_outside_tensor() -> None:
    data = serialize_tensor(gaussian(100), get_codec("none"))
    with pytest.raises(CorruptPayloadError):
        deserialize_tensor(with_fields(data, offset=1))


def test_nan_scale_in_uniform8() -> None:
    data = serialize_tensor(gaussian(1000), get_codec("uniform8"))
    start, end = params_span(data)
    params = msgpack.unpackb(data[start:end])
    for bad in ({"scale": float("nan")}, {"mid": float("inf")}, {"scale": -1.0}, {"scale": 1e38}):
        forged_params = msgpack.packb({**params, **bad})
        assert len(forged_params) == end - start
        with pytest.raises(NonFiniteError):
            deserialize_tensor(data[:start] + forged_params + data[end:])


def test_nan_scale_in_blockwise8() -> None:
    data = bytearray(serialize_tensor(gaussian(10_000), get_codec("blockwise8")))
    payload_start = len(data) - header_fields(bytes(data))[8]
    data[payload_start + 4 : payload_start + 8] = struct.pack("<f", float("nan"))
    with pytest.raises(NonFiniteError):
        deserialize_tensor(data)
    data[payload_start + 4 : payload_start + 8] = struct.pack("<f", -1.0)
    with pytest.raises(CorruptPayloadError):
        deserialize_tensor(data)


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "topk"])
def test_nan_in_payload_values(name: str) -> None:
    x = torch.zeros(1000)
    x[999] = 5.0  # the last payload value is this one for every codec listed
    data = bytearray(serialize_tensor(x, get_codec(name, fraction=0.001) if name == "topk" else get_codec(name)))
    nan = {"none": struct.pack("<f", float("nan")), "fp16": b"\x00\x7e", "bf16": b"\xc0\x7f"}.get(name)
    nan = nan or struct.pack("<f", float("nan"))
    data[-len(nan) :] = nan
    with pytest.raises(NonFiniteError):
        deserialize_tensor(data)


def test_corrupted_topk_index() -> None:
    x = gaussian(1000)
    data = serialize_tensor(x, get_codec("topk", fraction=0.01))  # k=10, 2-byte indices, padded to 24
    payload_start = len(data) - header_fields(data)[8]
    indices = list(struct.unpack_from("<10H", data, payload_start))
    for bad in ([*indices[:9], 1000], [indices[1], indices[0], *indices[2:]], [indices[0]] * 10):
        forged = bytearray(data)
        struct.pack_into("<10H", forged, payload_start, *bad)
        with pytest.raises(CorruptPayloadError):
            deserialize_tensor(forged)
    start, end = params_span(data)
    forged_k = msgpack.packb({"k": 11})
    assert len(forged_k) == end - start
    with pytest.raises(PayloadSizeError):
        deserialize_tensor(data[:start] + forged_k + data[end:])


def test_garbage_params() -> None:
    data = serialize_tensor(gaussian(1000), get_codec("uniform8"))
    start, end = params_span(data)
    for junk in (b"\xc1" * (end - start), msgpack.packb([1, 2, 3]).ljust(end - start, b"\0")):
        with pytest.raises(CorruptPayloadError):
            deserialize_tensor(data[:start] + junk + data[end:])


def test_chunk_stream_errors() -> None:
    x = gaussian(10_000)
    chunks = list(iter_encode_chunks(x, get_codec("fp16"), chunk_size_bytes=4096))
    with pytest.raises(PayloadSizeError, match="cut short"):
        decode_chunks(chunks[:-1])
    with pytest.raises(CorruptPayloadError, match="overlaps"):
        decode_chunks([*chunks, chunks[1]])
    with pytest.raises(PayloadSizeError):
        decode_chunks([])
    other = list(iter_encode_chunks(gaussian(9_000), get_codec("fp16"), chunk_size_bytes=4096))
    with pytest.raises(CorruptPayloadError):
        decode_chunks([chunks[0], other[1]])
    with pytest.raises(CorruptPayloadError, match="decode_chunks"):
        deserialize_tensor(chunks[1])
    assembler = ChunkAssembler()
    for data in chunks:
        assembler.add(data)
    assert torch.equal(assembler.result(), decode_chunks(chunks))


def test_random_corruption_never_crashes() -> None:
    """Flipped bytes anywhere give a CodecError or a tensor of the right shape, never anything else."""
    gen = torch.Generator().manual_seed(7)
    for name in CODECS:
        data = serialize_tensor(gaussian(3000).reshape(30, 100), get_codec(name))
        for _ in range(40):
            forged = bytearray(data)
            at = int(torch.randint(len(forged), (1,), generator=gen))
            forged[at] ^= 1 << int(torch.randint(8, (1,), generator=gen))
            try:
                y = deserialize_tensor(forged, max_numel=1 << 20)
            except CodecError:
                continue
            assert y.numel() <= 1 << 20


def test_dtype_without_wire_code() -> None:
    with pytest.raises(UnsupportedDtypeError):
        serialize_tensor(torch.zeros(3, dtype=torch.complex64), get_codec("none"))


def test_bad_chunk_size() -> None:
    with pytest.raises(ConfigError, match="chunk_size_bytes"):
        list(iter_encode_chunks(gaussian(10), get_codec("none"), chunk_size_bytes=0))


@pytest.mark.parametrize("name", CODECS)
def test_non_contiguous_and_requires_grad_inputs(name: str) -> None:
    base = gaussian(6000).reshape(60, 100).requires_grad_(True)
    x = base.t()[::2]  # a strided view that needs grad
    codec = get_codec(name)
    y = deserialize_tensor(serialize_tensor(x, codec))
    assert y.shape == x.shape and not y.requires_grad
    if name == "none":
        assert torch.equal(y, x.detach())
    chunked = decode_chunks(iter_encode_chunks(x, codec, chunk_size_bytes=2048))
    assert chunked.shape == x.shape


@pytest.mark.parametrize("name", ["none", "fp16", "blockwise8"])
def test_message_parts_values_and_into_agree_with_the_whole_message(name: str) -> None:
    x = gaussian(5000)
    codec = get_codec(name)
    parts = serialize_tensor_parts(x, codec)
    assert b"".join(bytes(p) for p in parts) == serialize_tensor(x, codec)
    data = serialize_tensor(x, codec)
    values = decode_chunk_values(data, 5000)
    out = torch.full((5000,), float("nan"))
    decode_chunk_into(data, out)
    assert torch.equal(values, out) and torch.equal(values, deserialize_tensor(data))
    with pytest.raises(PayloadSizeError):
        decode_chunk_values(data, 5001)  # a bigger slot than the message
    with pytest.raises(CodecError):
        decode_chunk_into(data, out[:4999])  # a smaller one: over the limit
    assert torch.equal(out, values)  # a refused message leaves the slot unchanged


def test_none_parts_share_the_tensor_memory_and_values_view_the_message() -> None:
    x = gaussian(1000)
    parts = serialize_tensor_parts(x, get_codec("none"))
    x[0] = 123.0  # the payload is a view: no copy was made
    assert torch.frombuffer(bytearray(parts[-1]), dtype=torch.float32)[0].item() == 123.0
    data = bytearray(serialize_tensor(x, get_codec("none")))
    values = decode_chunk_values(data, 1000)
    data[-4:] = torch.tensor([5.0]).numpy().tobytes()  # a view of the received bytes: no copy either
    assert values[-1].item() == 5.0
