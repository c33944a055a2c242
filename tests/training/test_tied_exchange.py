"""swarm.training.tied across machines: a slow or stuck peer of the other stage costs ``hedge_s``, not
``rpc_timeout_s``; a peer past a step it never kept answers at once; a node never asks itself; one peer sending a
bad tied gradient is outvoted by two honest ones (same bits as honest), and against one honest one moves no value
beyond it; on re-tie steps two drifted copies of the matrix become equal again (their mean), and only on those."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from swarm.p2p import Transport
from swarm.run.config import RunConfig
from swarm.errors import ProtocolError
from swarm.model import StageInputError, build_stages
from swarm.model.optim import make_optimizer
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.tied import TiedOutcome, TiedRequest, TiedService, robust_combine, tied_index
from tests.averaging.conftest import transports

RPC_TIMEOUT_S = 30.0  # far above every test's own deadline: a test that waits for it fails


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig.from_toml()


def _server(cfg: RunConfig, index: int) -> StageServer:
    stage = build_stages(cfg)[index]
    return StageServer(stage, make_optimizer(stage.parameters(), cfg.optimizer), cfg.optimizer, StageServerConfig())


def _service(cfg: RunConfig, t: Transport, server: StageServer, retie_every_steps: int = 0) -> TiedService:
    service = TiedService(
        t,
        cfg.codecs.policy(),
        run_id="run",
        num_stages=2,
        server_of=lambda: server,
        rpc_timeout_s=RPC_TIMEOUT_S,
        hedge_s=0.05,
        retie_every_steps=retie_every_steps,
    )
    service.register()
    return service


def _pair(
    cfg: RunConfig, ts: list[Transport], *, retie_every_steps: int
) -> tuple[StageServer, StageServer, list[TiedService], tuple[int, int]]:
    """A stage-0 and a last-stage server on ``ts[0]`` and ``ts[1]``, their services and tied indices."""
    first, last = _server(cfg, 0), _server(cfg, 1)
    services = [
        _service(cfg, t, s, retie_every_steps=retie_every_steps) for t, s in zip(ts, (first, last), strict=False)
    ]
    i0, i1 = tied_index(first), tied_index(last)
    assert i0 is not None and i1 is not None
    return first, last, services, (i0, i1)


def _grads(server: StageServer, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in server.parameters()]


async def test_a_stuck_peer_of_the_other_stage_costs_the_hedge_not_the_rpc_timeout(cfg: RunConfig) -> None:
    async with transports(3, salt=21) as ts:
        first, stuck, ready = _server(cfg, 0), _server(cfg, 1), _server(cfg, 1)
        services = [_service(cfg, t, s) for t, s in zip(ts, (first, stuck, ready), strict=False)]
        theirs = _grads(ready, 1)[tied_index(ready)]  # type: ignore[index]
        services[2].store.put(0, theirs)  # the stuck peer never finishes step 0
        grads = _grads(first, 2)
        mine = grads[tied_index(first)].clone()  # type: ignore[index]
        async with asyncio.timeout(10):
            combined = (await services[0].combine(first, 0, grads, [ts[1].peer_id, ts[2].peer_id])).combined
    assert combined
    assert torch.equal(grads[tied_index(first)], mine + theirs)  # type: ignore[index]


async def test_a_peer_past_the_step_without_its_gradient_answers_at_once(cfg: RunConfig) -> None:
    async with transports(2, salt=22) as ts:
        first, moved_on = _server(cfg, 0), _server(cfg, 1)
        services = [_service(cfg, t, s) for t, s in zip(ts, (first, moved_on), strict=False)]
        moved_on.skip_to(3)  # it downloaded a peer's state of step 3: steps 0..2 never reach its store
        grads = _grads(first, 3)
        mine = grads[tied_index(first)].clone()  # type: ignore[index]
        async with asyncio.timeout(10):
            with pytest.raises(StageInputError, match="no tied gradient of step 1"):
                await services[1].rpc_tied(None, TiedRequest(run_id="run", stage=1, step=1))  # type: ignore[arg-type]
            combined = (await services[0].combine(first, 1, grads, [ts[1].peer_id])).combined
    assert not combined and torch.equal(grads[tied_index(first)], mine)  # type: ignore[index]


async def test_a_node_listed_in_the_other_stage_never_asks_itself(
    cfg: RunConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with transports(2, salt=23) as ts:
        first, other = _server(cfg, 0), _server(cfg, 1)
        services = [_service(cfg, t, s) for t, s in zip(ts, (first, other), strict=False)]
        theirs = _grads(other, 4)[tied_index(other)]  # type: ignore[index]
        services[1].store.put(5, theirs)
        grads = _grads(first, 5)
        with caplog.at_level(logging.WARNING, logger="swarm.training.tied"):
            async with asyncio.timeout(10):
                combined = (await services[0].combine(first, 5, grads, [ts[0].peer_id, ts[1].peer_id])).combined
    assert combined and not [r for r in caplog.records if "failed" in r.getMessage()]


async def test_one_bad_peer_of_three_is_outvoted_to_the_honest_bits(
    cfg: RunConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with transports(4, salt=24) as ts:
        first, liar, honest_a, honest_b = _server(cfg, 0), _server(cfg, 1), _server(cfg, 1), _server(cfg, 1)
        services = [_service(cfg, t, s) for t, s in zip(ts, (first, liar, honest_a, honest_b), strict=False)]
        theirs = _grads(honest_a, 6)[tied_index(honest_a)]  # type: ignore[index]
        services[1].store.put(2, theirs * -1000)
        services[2].store.put(2, theirs)
        services[3].store.put(2, theirs)
        grads = _grads(first, 7)
        mine = grads[tied_index(first)].clone()  # type: ignore[index]
        with caplog.at_level(logging.WARNING, logger="swarm.training.tied"):
            async with asyncio.timeout(10):
                # the liar is among the first two asked: they differ, so a third is asked
                outcome = await services[0].combine(first, 2, grads, [ts[1].peer_id, ts[2].peer_id, ts[3].peer_id])
                combined = outcome.combined
    assert combined
    assert torch.equal(grads[tied_index(first)], mine + theirs)  # type: ignore[index]
    assert any("differing tied gradients" in r.getMessage() for r in caplog.records)


async def test_against_one_honest_peer_a_bad_answer_moves_no_value_beyond_the_honest_one(cfg: RunConfig) -> None:
    async with transports(3, salt=25) as ts:
        first, liar, honest = _server(cfg, 0), _server(cfg, 1), _server(cfg, 1)
        services = [_service(cfg, t, s) for t, s in zip(ts, (first, liar, honest), strict=False)]
        index = tied_index(first)
        assert index is not None
        theirs = _grads(honest, 8)[tied_index(honest)]  # type: ignore[index]
        bad = theirs * -1000 + torch.randn(theirs.shape, generator=torch.Generator().manual_seed(9)) * 50
        services[1].store.put(4, bad)
        services[2].store.put(4, theirs)
        grads = _grads(first, 10)
        mine = grads[index].clone()
        async with asyncio.timeout(10):
            combined = (await services[0].combine(first, 4, grads, [ts[1].peer_id, ts[2].peer_id])).combined
    assert combined
    used = grads[index] - mine  # the other stage's part as combined (to float rounding of the sum)
    assert bool((used.abs() <= theirs.abs() * (1 + 1e-6) + 1e-6).all())  # never larger than the honest value
    assert bool((used * theirs >= 0).all())  # never of the opposite sign
    plain_mean = (bad + theirs) / 2
    assert (used - theirs).norm() < 0.01 * (plain_mean - theirs).norm()


def test_robust_combine_is_exact_for_an_identical_majority_and_bounded_otherwise() -> None:
    gen = torch.Generator().manual_seed(11)
    honest, other = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    assert torch.equal(robust_combine([honest]), honest)
    assert torch.equal(robust_combine([honest, honest]), honest)
    assert torch.equal(robust_combine([honest * 1e6, honest, honest]), honest)
    three = robust_combine([honest, other, honest * -1000])
    lo, hi = torch.minimum(honest, other), torch.maximum(honest, other)
    assert bool(((three >= lo) & (three <= hi)).all())  # within the range of the two honest answers
    two = robust_combine([honest, other])
    assert bool((two.abs() <= torch.minimum(honest.abs(), other.abs())).all())
    assert bool(((two == 0) | (torch.sign(two) == torch.sign(honest))).all())


async def test_a_retie_step_makes_drifted_copies_equal_again_and_other_steps_leave_them(cfg: RunConfig) -> None:
    async with transports(2, salt=26) as ts:
        first, last, services, (i0, i1) = _pair(cfg, ts, retie_every_steps=5)
        noise = 0.01 * torch.randn(first.parameters()[i0].shape, generator=torch.Generator().manual_seed(12))
        with torch.no_grad():  # as a failed exchange some steps ago would have left it
            last.parameters()[i1].copy_(first.parameter_copy(i0) + noise)
        before = (first.parameter_copy(i0), last.parameter_copy(i1))

        async def both(step: int) -> tuple[TiedOutcome, TiedOutcome]:
            grads = (_grads(first, 13), _grads(last, 14))
            async with asyncio.timeout(10):
                a, b = await asyncio.gather(
                    services[0].combine(first, step, grads[0], [ts[1].peer_id]),
                    services[1].combine(last, step, grads[1], [ts[0].peer_id]),
                )
            assert a.combined and b.combined and torch.equal(grads[0][i0], grads[1][i1])  # one combined gradient
            return a, b

        assert await both(7) == (TiedOutcome(combined=True), TiedOutcome(combined=True))  # not a re-tie step
        a, b = await both(10)
        assert list(a.replace) == [i0] and list(b.replace) == [i1]
        assert torch.equal(a.replace[i0], b.replace[i1])  # the same bits on both sides
        torch.testing.assert_close(a.replace[i0], (before[0] + before[1]) / 2)
        updates = (_grads(first, 15), _grads(last, 15))
        updates[1][i1] = updates[0][i0].clone()  # the combined gradient both sides hold
        for server, update, outcome in ((first, updates[0], a), (last, updates[1], b)):
            server.close_step()
            server.apply_step(update, replace=outcome.replace)
        assert first.step == last.step == 1
        assert torch.equal(first.parameter_copy(i0), last.parameter_copy(i1))  # equal after the same update


async def test_a_retie_step_with_equal_copies_changes_nothing(cfg: RunConfig) -> None:
    async with transports(2, salt=27) as ts:
        first, last, services, (i0, i1) = _pair(cfg, ts, retie_every_steps=1)
        assert torch.equal(first.parameter_copy(i0), last.parameter_copy(i1))  # built tied
        async with asyncio.timeout(10):
            a, b = await asyncio.gather(
                services[0].combine(first, 3, _grads(first, 16), [ts[1].peer_id]),
                services[1].combine(last, 3, _grads(last, 17), [ts[0].peer_id]),
            )
    assert a == b == TiedOutcome(combined=True)


async def test_a_malformed_or_unanswerable_tied_request_is_refused(cfg: RunConfig) -> None:
    with pytest.raises(ProtocolError, match="what must be"):
        TiedRequest.from_wire({"run_id": "run", "stage": 1, "step": 0, "what": "optimizer"})
    async with transports(1, salt=28) as ts:
        last = _server(cfg, 1)
        service = _service(cfg, ts[0], last, retie_every_steps=10)
        index = tied_index(last)
        assert index is not None
        service.store.put(3, _grads(last, 18)[index])  # step 3: not a re-tie step, no matrix kept
        async with asyncio.timeout(10):
            with pytest.raises(StageInputError, match="not a re-tie step"):
                await service.rpc_tied(None, TiedRequest(run_id="run", stage=1, step=3, what="weight"))  # type: ignore[arg-type]


async def test_two_differing_matrices_at_a_retie_step_leave_this_copy_alone(cfg: RunConfig) -> None:
    async with transports(3, salt=29) as ts:
        first, liar, honest = _server(cfg, 0), _server(cfg, 1), _server(cfg, 1)
        services = [_service(cfg, t, s, retie_every_steps=5) for t, s in zip(ts, (first, liar, honest), strict=False)]
        i0, i1 = tied_index(first), tied_index(honest)
        assert i0 is not None and i1 is not None
        theirs = _grads(honest, 19)[i1]
        drifted = honest.parameter_copy(i1) + 0.01
        services[1].store.put(5, theirs, torch.zeros_like(drifted))  # a zero matrix would halve ours if averaged
        services[2].store.put(5, theirs, drifted)
        grads = _grads(first, 20)
        mine = grads[i0].clone()
        async with asyncio.timeout(10):
            outcome = await services[0].combine(first, 5, grads, [ts[1].peer_id, ts[2].peer_id])
    assert outcome == TiedOutcome(combined=True)  # the gradients agreed: combined; the matrices did not: no re-tie
    assert torch.equal(grads[i0], mine + theirs)
