"""Round trips of every codec on several distributions and dtypes, each against its stated bound."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.compression import Codec, codec_names, deserialize_tensor, get_codec, serialize_tensor
from swarm.compression.errors import CorruptPayloadError, NonFiniteError, UnsupportedDtypeError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("gaussian", "heavy", "constant", "empty", "single")


def make(kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = torch.randn(96, 128, generator=gen)
    elif kind == "heavy":  # Student-t with 2 degrees of freedom: heavy tails, a few large outliers
        normal = torch.randn(96, 128, generator=gen)
        chi2 = torch.randn(2, 96, 128, generator=gen).pow(2).sum(0)
        x = normal / (chi2 / 2).sqrt()
    elif kind == "constant":
        x = torch.full((17, 3), 3.5)
    elif kind == "empty":
        x = torch.empty(0, 5)
    else:
        x = torch.tensor([-2.25])
    return x.to(dtype)


def roundtrip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    y = deserialize_tensor(serialize_tensor(x, codec))
    assert y.dtype == x.dtype and y.shape == x.shape
    return y


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_none_is_bit_exact(kind: str, dtype: torch.dtype) -> None:
    x = make(kind, dtype)
    y = roundtrip(get_codec("none"), x)
    assert torch.equal(y.view(torch.uint8) if y.numel() else y, x.view(torch.uint8) if x.numel() else x)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64))
def test_none_handles_any_dtype(dtype: torch.dtype) -> None:
    x = (torch.arange(-6, 6) % 3).to(dtype).reshape(3, 4)
    y = roundtrip(get_codec("none"), x)
    assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("values", "dtype", "width"),
    [
        ([0, 7, 255], torch.int64, 1),
        ([0, 2047, 65535], torch.int64, 2),  # token ids: a quarter of their int64 bytes
        ([-1, 70_000], torch.int64, 4),
        ([0, 1 << 40], torch.int64, 8),  # no narrower type holds it: its own bytes
        ([0, 300], torch.int32, 2),
        ([-5, 5], torch.int16, 2),
    ],
)
def test_none_narrows_integers_losslessly(values: list[int], dtype: torch.dtype, width: int) -> None:
    x = torch.tensor(values * 100, dtype=dtype).reshape(20, -1)
    encoded = get_codec("none").encode(x)
    assert encoded.payload_size_bytes == x.numel() * width
    y = deserialize_tensor(serialize_tensor(x, get_codec("none")))
    assert y.dtype == dtype and torch.equal(x, y)


def test_none_refuses_a_narrowing_its_dtype_cannot_take() -> None:
    codec = get_codec("none")
    for dtype, params in ((torch.float32, {"narrow": 2}), (torch.int16, {"narrow": 2}), (torch.int64, {"narrow": 3})):
        with pytest.raises(CorruptPayloadError):
            codec.payload_size_bytes(numel=4, dtype=dtype, params=params)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cast_codecs_bound(name: str, kind: str, dtype: torch.dtype) -> None:
    """Each element is within one rounding of the 16-bit type (relative), or of its smallest subnormal."""
    wire = torch.float16 if name == "fp16" else torch.bfloat16
    x = make(kind, dtype)
    y = roundtrip(get_codec(name), x)
    bound = x.float().abs() * unit_roundoff(wire) + float(torch.finfo(wire).smallest_normal) * unit_roundoff(wire)
    assert bool(((y.float() - x.float()).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_blockwise8_bound(kind: str, dtype: torch.dtype) -> None:
    """Per element: within 0.0071 x its block's absmax (plus one rounding of the output dtype)."""
    x = make(kind, dtype)
    y = roundtrip(get_codec("blockwise8", blocksize=256), x)
    xf, yf = x.float().reshape(-1), y.float().reshape(-1)
    pad = (-xf.numel()) % 256
    absmax = torch.nn.functional.pad(xf, (0, pad)).reshape(-1, 256).abs().amax(1, keepdim=True)
    bound = (absmax.expand(-1, 256).reshape(-1)[: xf.numel()] * 0.0071) * (1 + 1e-5)
    bound = bound + xf.abs() * 2 * unit_roundoff(dtype)
    assert bool(((yf - xf).abs() <= bound).all())


def test_blockwise8_gaussian_relative_error() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 20, generator=gen)
    y = roundtrip(get_codec("blockwise8"), x)
    assert float((y - x).norm() / x.norm()) <= 0.015


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_uniform8_bound(kind: str, dtype: torch.dtype) -> None:
    """Per element: within scale / 2 = (max - min) / 510, plus float32 and output-dtype rounding."""
    x = make(kind, dtype)
    y = roundtrip(get_codec("uniform8"), x)
    if x.numel() == 0:
        return
    xf, yf = x.float(), y.float()
    scale = float(xf.max() - xf.min()) / 255
    bound = scale / 2 * (1 + 1e-4) + xf.abs() * 2 * unit_roundoff(dtype) + 1e-6 * float(xf.abs().max())
    assert bool(((yf - xf).abs() <= bound).all())


def test_uniform8_gaussian_relative_error() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 20, generator=gen)
    y = roundtrip(get_codec("uniform8"), x)
    assert float((y - x).norm() / x.norm()) <= 0.015


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_keeps_the_largest_exactly(kind: str, dtype: torch.dtype) -> None:
    codec = get_codec("topk", fraction=0.05)
    x = make(kind, dtype)
    y = roundtrip(codec, x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    kept = torch.zeros(xf.numel(), dtype=torch.bool)
    kept[torch.topk(xf.float().abs(), codec.num_kept(xf.numel())).indices] = True
    if kind != "constant":  # ties: any k of equal magnitudes are a valid choice
        assert torch.equal(yf[kept], xf[kept])
        assert bool((yf[~kept] == 0).all())
    assert int((yf != 0).sum()) <= codec.num_kept(xf.numel())
    dropped = (xf.float() - yf.float()).abs()
    if xf.numel():  # bound: nothing dropped is larger than the smallest value kept
        assert float(dropped.max()) <= float(xf.float().abs()[kept].min())


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "blockwise8", "uniform8", "topk"])
def test_every_codec_refuses_nan_and_inf(name: str) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(300)
        x[123] = bad
        with pytest.raises(NonFiniteError):
            serialize_tensor(x, get_codec(name))


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    # the finiteness check sums first; an overflowing sum of finite values must fall back to the exact check
    for dtype in (torch.float32, torch.float16):
        big = torch.full((64,), torch.finfo(dtype).max / 2, dtype=dtype)
        assert math.isinf(big.sum().item())
        assert torch.equal(roundtrip(get_codec("none"), big), big)
        big[5] = float("nan")
        with pytest.raises(NonFiniteError):
            serialize_tensor(big, get_codec("none"))


def test_fp16_refuses_overflow_instead_of_clamping() -> None:
    x = torch.tensor([1.0, 1e6])
    with pytest.raises(NonFiniteError, match="range"):
        serialize_tensor(x, get_codec("fp16"))
    assert torch.equal(roundtrip(get_codec("bf16"), x), x.bfloat16().float())


@pytest.mark.parametrize("name", ["fp16", "bf16", "blockwise8", "uniform8", "topk"])
def test_lossy_codecs_refuse_integers(name: str) -> None:
    with pytest.raises(UnsupportedDtypeError, match="none"):
        serialize_tensor(torch.arange(10), get_codec(name))


def test_float64_goes_through_lossy_codecs() -> None:
    x = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name in ("fp16", "bf16", "blockwise8", "uniform8"):
        y = roundtrip(get_codec(name), x)
        assert float((y - x).norm() / x.norm()) < 0.02


def test_registry_names_and_protocol() -> None:
    assert set(codec_names()) >= {"none", "fp16", "bf16", "blockwise8", "uniform8", "topk"}
    for name in codec_names():
        codec = get_codec(name)
        assert isinstance(codec, Codec)
        assert codec.estimated_ratio(torch.float32) >= 1.0


def test_estimated_ratio_matches_wire_size() -> None:
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(4))
    for name in ("none", "fp16", "bf16", "blockwise8", "uniform8", "topk"):
        codec = get_codec(name)
        actual = x.numel() * 4 / len(serialize_tensor(x, codec))
        assert actual == pytest.approx(codec.estimated_ratio(torch.float32), rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "blockwise8", "uniform8", "topk"])
def test_cuda_tensor_stays_on_cuda(name: str) -> None:
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(5)).cuda()
    codec = get_codec(name)
    data = serialize_tensor(x, codec)
    y = deserialize_tensor(data, device="cuda")
    assert y.is_cuda
    y_cpu = deserialize_tensor(data)
    assert torch.allclose(y.cpu(), y_cpu)
    bound = {"none": 0.0, "fp16": 1e-3, "bf16": 5e-3, "blockwise8": 0.015, "uniform8": 0.015, "topk": 1.0}[name]
    assert float((y_cpu - x.cpu()).norm() / x.norm().cpu()) <= bound
    if name == "topk":  # the same k values are kept, whichever device selected them
        assert torch.equal(y_cpu, deserialize_tensor(serialize_tensor(x.cpu(), codec)))


@pytest.mark.parametrize("layout", ["random", "sorted", "constant", "spiky"])
def test_topk_sampled_selection_is_exact(layout: str) -> None:
    """The sampled-threshold fast path selects exactly what torch.topk selects, whatever the layout."""
    from swarm.compression.topk import top_indices

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1 << 18, generator=gen).abs()
    if layout == "sorted":
        x = x.sort().values
    elif layout == "constant":
        x = torch.ones(1 << 18)
    elif layout == "spiky":  # the large values all sit between sample points
        x = torch.zeros(1 << 18)
        x[1::64] = torch.rand(1 << 12, generator=gen) + 1
    for k in (1, 100, 2621, 1 << 16):
        got = top_indices(x, k)
        assert got.numel() == k and got.unique().numel() == k
        assert torch.equal(x[got].sort().values, torch.topk(x, k).values.sort().values)
