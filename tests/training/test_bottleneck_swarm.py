"""A swarm trains with the activation bottleneck on: the loss falls, the stage traffic the transport counts is a
fraction of the full-width activations', the projections are averaged like every other parameter, and a node that
joins mid-run downloads them with its stage's state."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from swarm.model import build_stages
from tests.training.swarm_harness import Swarm, small_run, stage_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RATIO = 32
STEPS = 5
ACTIVATION_METHODS = ("stage.forward", "stage.backward")


async def test_a_swarm_trains_through_the_bottleneck_with_fewer_stage_bytes_and_a_joiner_gets_it() -> None:
    base = small_run()
    run = dataclasses.replace(base, pipeline=dataclasses.replace(base.pipeline, activation_bottleneck_ratio=RATIO))
    initial = build_stages(run)
    swarm = Swarm(run)
    try:
        first = [await swarm.add(seed=40 + i, max_steps=STEPS, stage=i % 2, start_after_peers=3) for i in range(3)]
        await swarm.wait_step(first, 2, timeout_s=90)
        late = await swarm.add(seed=43, max_steps=STEPS, stage=1)
        assert late.role.server is not None and late.role.server.step >= 2  # downloaded, not the initial step
        up = dict(late.role.server.model.named_parameters())["bottleneck_up.proj.weight"]
        assert not torch.equal(up, dict(initial[1].named_parameters())["bottleneck_up.proj.weight"])
        nodes = [*first, late]
        async with asyncio.timeout(120):
            await asyncio.gather(*(n.task for n in nodes))

        losses = {k: sum(v) / len(v) for n in first for k, v in n.role.losses.items()}
        assert losses[STEPS - 1] < losses[0] - 0.1, losses
        for stage in (0, 1):  # replicas agree: the projections were averaged with the rest
            a, b = [n for n in nodes if n.role.server is not None and n.role.server.index == stage][:2]
            for p, q in zip(stage_weights(a), stage_weights(b), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            named = dict(a.role.server.model.named_parameters())  # type: ignore[union-attr]
            part = "bottleneck_down" if stage == 0 else "bottleneck_up"
            trained = named[f"{part}.proj.weight"]
            assert not torch.equal(trained, dict(initial[stage].named_parameters())[f"{part}.proj.weight"])

        # the activations' bytes, counted by the transports, retries included (a driver resends a microbatch to a
        # replica still closing the previous step): under half of one step's full-width fp32 payloads, where the
        # narrow payloads alone are 1/32 of them (the exact sizes: tests/model/test_bottleneck_stages.py)
        traffic = [n.trainer.summary().traffic for n in first]
        assert all(t is not None and t.steps == STEPS and t.sent_bytes_per_step.get("avg", 0) > 0 for t in traffic)
        sent = sum(
            t.method_sent_bytes_per_step.get(m, 0.0) for t in traffic if t is not None for m in ACTIVATION_METHODS
        )
        microbatches = run.batch.target_batch_size // run.batch.microbatch_size
        full_width = 2 * microbatches * run.batch.microbatch_size * run.model.seq_len * run.model.d_model * 4
        assert 0 < sent < full_width / 2, (sent, full_width)
    finally:
        await swarm.close()
