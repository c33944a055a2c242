"""Delayed parameter updates (``[averaging] delayed_update``, `swarm.training.delayed`).

- the pending update travels with a stage's state: ``to_extra`` / ``from_extra`` round-trip it, and a malformed one
  from a peer (wrong step, shape, dtype, a non-finite value, a bad key) is refused, not applied;
- ``StageServer.apply_updates`` applies its updates in order, as that many ``apply_step`` calls would;
- the setting is refused outside every_step mode, naming the field;
- in an in-process swarm (two replicas of stage 0, one joining mid-run, and the last stage): the first close applies
  nothing (no step before it), every replica ends with ``max_steps`` optimizer updates applied, the replicas hold the
  same weights bit for bit, and so do the tied matrix's two copies.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from swarm.errors import ConfigError
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stage
from swarm.run.averaging import AveragingSettings
from swarm.run.config import RunConfig
from swarm.training.delayed import GRAD, REPLACE, STEP_KEY, DelayedUpdate, Pending
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.tied import tied_index
from tests.training.swarm_harness import LiveNode, Swarm, small_run, stage_weights


def delayed_run(delayed: bool = True) -> RunConfig:
    run = small_run()
    return dataclasses.replace(run, averaging=dataclasses.replace(run.averaging, delayed_update=delayed))


def params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def test_a_pending_update_round_trips_through_the_state() -> None:
    ps = params()
    pending = Pending(step=7, grads=[torch.ones(4, 3), torch.full((5,), 2.0)], replace={0: torch.zeros(4, 3)})
    back = Pending.from_extra(pending.to_extra(), 7, ps)
    assert back is not None and back.step == 7
    assert all(torch.equal(a, b) for a, b in zip(back.grads, pending.grads, strict=True))
    assert back.replace.keys() == {0} and torch.equal(back.replace[0], pending.replace[0])
    assert Pending.from_extra(pending.to_extra(), 8, ps) is None  # another step's update is not this one's
    assert Pending.from_extra({}, 7, ps) is None


@pytest.mark.parametrize(
    "key, value",
    [
        (f"{GRAD}1", torch.ones(6)),  # wrong shape
        (f"{GRAD}1", torch.ones(5, dtype=torch.float64)),  # wrong dtype
        (f"{GRAD}0", torch.full((4, 3), float("nan"))),  # not finite
        (f"{REPLACE}5", torch.zeros(4, 3)),  # no such parameter
        (f"{REPLACE}x", torch.zeros(4, 3)),  # not an index
        (STEP_KEY, torch.tensor([7, 7])),  # not one step
    ],
)
def test_a_malformed_pending_update_from_a_peer_is_refused(key: str, value: torch.Tensor) -> None:
    extra = Pending(step=7, grads=[torch.ones(4, 3), torch.ones(5)]).to_extra()
    extra[key] = value
    assert Pending.from_extra(extra, 7, params()) is None


def server(seed: int) -> StageServer:
    torch.manual_seed(seed)
    run = small_run()
    model = build_stage(run, 1)
    return StageServer(model, make_optimizer(model.parameters(), run.optimizer), run.optimizer, StageServerConfig())


def test_apply_updates_is_apply_step_in_order() -> None:
    one, two = server(5), server(5)
    gen = torch.Generator().manual_seed(9)
    updates = [[torch.randn(p.shape, generator=gen) for p in one.parameters()] for _ in range(2)]
    one.apply_updates([(g, {}) for g in updates], new_step=2, extra_state={"x": torch.ones(1)})
    for g in updates:
        two.apply_step(g)
    assert one.step == two.step == 2 and one.extra_state.keys() == {"x"}
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters(), strict=True))
    one.apply_updates([], new_step=5)  # no update: the step only advances
    assert one.step == 5 and all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters(), strict=True))


def test_delayed_update_is_every_step_only() -> None:
    with pytest.raises(ConfigError, match="delayed_update"):
        AveragingSettings(mode="local_sgd", delayed_update=True)


def optimizer_steps(node: LiveNode) -> tuple[int, set[int]]:
    """The node's step and the optimizer updates each of its parameters has had, read together (under the lock)."""
    server = node.role.server
    assert server is not None
    with server.lock:
        return server.step, {int(s["step"]) for s in server.optimizer.state.values()}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("delayed", [True, False], ids=["delayed", "every_step"])
async def test_replicas_with_delayed_updates_stay_equal_and_apply_every_step(delayed: bool) -> None:
    swarm = Swarm(delayed_run(delayed))
    steps = 10
    try:
        first = await swarm.add(seed=140, stage=0, max_steps=steps)
        last = await swarm.add(seed=141, stage=1, max_steps=steps)
        await swarm.wait_step([first, last], 4, timeout_s=60)
        step, updates = optimizer_steps(first)
        assert step < steps
        assert updates == ({step - 1} if delayed else {step})  # delayed: the first close applied nothing
        joiner = await swarm.add(seed=142, stage=0, max_steps=steps)
        async with asyncio.timeout(120):
            await asyncio.gather(*(n.task for n in (first, last, joiner)))
        for node in (first, last, joiner):  # the last step applied both pending updates
            assert optimizer_steps(node) == (steps, {steps})
        assert all(torch.equal(a, b) for a, b in zip(stage_weights(first), stage_weights(joiner), strict=True))
        one, other = first.role.server, last.role.server
        assert one is not None and other is not None
        index, other_index = tied_index(one), tied_index(other)
        assert index is not None and other_index is not None
        assert torch.equal(one.parameter_copy(index), other.parameter_copy(other_index))
    finally:
        await swarm.close()


async def test_a_round_of_a_stage_the_node_left_is_not_applied() -> None:
    """A node that moved to another stage (rebalancing) while a round of its old stage ran applies what its new
    stage's loaded state carries, never the old stage's gradients."""
    old, new = server(5), server(6)
    delayed = DelayedUpdate(None, replicas=None, average_round=None)  # type: ignore[arg-type]
    mine = Pending(step=3, grads=[torch.ones_like(p) for p in old.parameters()])

    async def round_() -> Pending:
        return mine

    delayed._task, delayed._task_of = asyncio.create_task(round_()), (old, 3)
    assert await delayed._take(new, 3) is None  # the new stage's state carries no update of step 3
    assert delayed._task is None  # and the old round is gone
    delayed._task, delayed._task_of = asyncio.create_task(round_()), (old, 3)
    assert await delayed._take(old, 3) is mine
