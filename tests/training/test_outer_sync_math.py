"""local_sgd's arithmetic: the outer Nesterov step against hand-computed values and torch's SGD, the top-k
quantization's error bounds, error feedback's invariant, and the lossless ``sparse`` codec that carries it."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.compression import CorruptPayloadError, deserialize_tensor, get_codec, serialize_tensor
from swarm.compression.feedback import ErrorFeedback
from swarm.compression.sparse import topk_quantize
from swarm.errors import ConfigError
from swarm.run.config import RunConfig
from swarm.training.outer_sync import outer_step


def test_outer_step_matches_hand_computed_nesterov() -> None:
    anchor = [torch.tensor([1.0, 2.0])]
    momentum = [torch.tensor([0.5, -1.0])]
    pseudo = [torch.tensor([0.2, 0.4])]
    weights, buffers = outer_step(anchor, momentum, pseudo, lr=0.7, momentum_factor=0.9)
    # m = 0.9 * m + g = [0.65, -0.5]; w = a - 0.7 * (g + 0.9 * m) = [1 - 0.7 * 0.785, 2 - 0.7 * -0.05]
    assert buffers[0].tolist() == pytest.approx([0.65, -0.5])
    assert weights[0].tolist() == pytest.approx([0.4505, 2.035])
    assert anchor[0].tolist() == [1.0, 2.0]  # inputs untouched


def test_the_default_outer_step_is_the_mean_of_the_replicas_weights() -> None:
    """lr 1, momentum 0 (the defaults): the anchor minus the mean pseudo-gradient is the replicas' mean weights."""
    anchor = torch.tensor([1.0, -2.0, 0.5])
    replicas = [torch.tensor([0.5, -1.0, 0.5]), torch.tensor([1.5, -2.5, 1.5])]
    mean_pseudo = sum(anchor - w for w in replicas) / len(replicas)
    weights, buffers = outer_step([anchor], [torch.zeros(3)], [mean_pseudo], lr=1.0, momentum_factor=0.0)
    assert weights[0].tolist() == pytest.approx([1.0, -1.75, 1.0])  # (w1 + w2) / 2
    assert buffers[0].tolist() == pytest.approx(mean_pseudo.tolist())


def test_outer_step_is_torch_sgd_with_nesterov_over_rounds() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    param = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    anchor, momentum = [start.clone()], [torch.zeros_like(start)]
    for _ in range(4):
        g = torch.randn(5, 3, generator=gen)
        param.grad = g.clone()
        sgd.step()
        weights, momentum = outer_step(anchor, momentum, [g], lr=0.7, momentum_factor=0.9)
        anchor = weights
        assert torch.allclose(anchor[0], param.detach(), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_topk_quantize_keeps_k_values_within_the_bound(bits: int) -> None:
    x = torch.randn(40, 250, generator=torch.Generator().manual_seed(bits))
    fraction = 0.03
    q = topk_quantize(x, fraction=fraction, bits=bits)
    kept = q != 0
    k = math.ceil(fraction * x.numel())
    assert q.shape == x.shape and int(kept.sum()) == k
    # the kept entries are the k largest magnitudes
    assert float(x.abs()[kept].min()) >= float(x.abs()[~kept].max())
    scale = float(x.abs()[kept].max())
    assert float((q[kept] - x[kept]).abs().max()) <= scale / (1 << bits) + 1e-6
    assert q[kept].unique().numel() <= 1 << bits
    assert bool((torch.sign(q[kept]) == torch.sign(x[kept])).all()) or bits == 1


def test_topk_quantize_refuses_bad_settings_and_keeps_zeros() -> None:
    with pytest.raises(ConfigError):
        topk_quantize(torch.ones(4), fraction=0.0, bits=2)
    with pytest.raises(ConfigError):
        topk_quantize(torch.ones(4), fraction=0.5, bits=9)
    assert torch.equal(topk_quantize(torch.zeros(10), fraction=0.5, bits=2), torch.zeros(10))


def test_error_feedback_sends_everything_eventually() -> None:
    """sum(inputs) - sum(sent) == residual after every round, and the residual stays bounded."""
    gen = torch.Generator().manual_seed(7)
    feedback = ErrorFeedback(torch.zeros(2000))
    total_in, total_sent = torch.zeros(2000), torch.zeros(2000)
    for _ in range(60):
        g = torch.randn(2000, generator=gen)
        compensated = feedback.compensate(g)
        sent = topk_quantize(compensated, fraction=0.05, bits=2)
        feedback.record(compensated, sent)
        total_in += g
        total_sent += sent
        assert torch.allclose(total_in - total_sent, feedback.residual, atol=1e-3)
    # without feedback the residual would grow like sqrt(rounds) * 60 rounds of dropped mass; with it, it is a
    # few inputs' worth
    assert float(feedback.residual.abs().max()) < 20.0


def test_sparse_codec_is_lossless_and_small_on_quantized_topk() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    q = topk_quantize(x, fraction=0.02, bits=2)
    data = serialize_tensor(q, get_codec("sparse"))
    assert torch.equal(deserialize_tensor(data), q)
    # 4000 kept values: 4-byte indices plus 2-bit codes, against 800 KB raw
    assert len(data) < 4000 * 4.5 + 512
    mixed = q.clone()
    mixed[::7] += 0.5  # many distinct values: raw values instead of a codebook, still exact
    assert torch.equal(deserialize_tensor(serialize_tensor(mixed, get_codec("sparse"))), mixed)
    dense = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    data = serialize_tensor(dense, get_codec("sparse"))
    assert torch.equal(deserialize_tensor(data), dense) and len(data) <= 4000 + 256


def test_sparse_codec_refuses_corrupt_payloads() -> None:
    codec = get_codec("sparse")
    q = topk_quantize(torch.randn(5000, generator=torch.Generator().manual_seed(3)), fraction=0.01, bits=2)
    enc = codec.encode(q)
    raw = bytearray(enc.payload_view())
    raw[0:2], raw[2:4] = raw[2:4], raw[0:2]  # the first two indices swapped: not increasing
    with pytest.raises(CorruptPayloadError):
        codec.decode(
            type(enc)(codec=enc.codec, dtype=enc.dtype, shape=enc.shape, params=enc.params, payload=(bytes(raw),))
        )
    bad_params = {**enc.params, "m": int(enc.params["k"]) + 1}
    with pytest.raises(CorruptPayloadError):
        codec.decode(
            type(enc)(codec=enc.codec, dtype=enc.dtype, shape=enc.shape, params=bad_params, payload=enc.payload)
        )


def test_run_config_names_the_mode() -> None:
    run = RunConfig.load(None, ['averaging.mode="local_sgd"', "averaging.inner_steps=4"])
    # the defaults: plain averaging (docs/averaging.md, "When to choose which", has the figures)
    assert run.averaging.local_sgd and run.averaging.outer_lr == 1.0 and run.averaging.outer_momentum == 0.0
    assert RunConfig.load(None).averaging.inner_steps == 34
    assert [s for s in range(12) if run.averaging.is_sync_step(s)] == [3, 7, 11]
    assert not RunConfig.load(None).averaging.local_sgd
    with pytest.raises(ConfigError, match=r"averaging\.mode"):
        RunConfig.load(None, ['averaging.mode="sometimes"'])
    with pytest.raises(ConfigError, match="outer_compression"):
        RunConfig.load(None, ['averaging.outer_compression="zip"'])
