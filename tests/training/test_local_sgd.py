"""local_sgd mode in real training roles (in-process swarms) and its verification.

- a node that joins between two outer syncs downloads a peer's state (the last sync's anchor and momentum plus that
  peer's inner progress) and takes part in the next sync: afterwards both replicas hold the same anchor, bit for
  bit, and so do their weights once the run ends (its last step is a sync); no replica was ever re-downloaded
  between syncs (the digest check runs at syncs only), and the tied matrix's two copies (stages 0 and 1) are equal;
- a replica sending a sign-flipped pseudo-gradient at an outer sync (CenteredClip, top-k quantized) is reported by
  its honest stage peers;
- a lazy replica is flagged by replaying receipts that name the weights that computed them, while the replicas of
  its stage hold different weights (between syncs), and the honest replica's work passes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from swarm.compression import Role
from swarm.data import ShardedData
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stages
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig
from swarm.testing.misbehave import MisbehaveConfig, Misbehaviour
from swarm.training.checkpoint import capture_state
from swarm.training.outer_sync import ANCHOR
from swarm.training.replayer import StageReplayer
from swarm.training.stage_rpc import encode
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.tied import tied_index
from swarm.verification.outliers import fetch_reports
from swarm.verification.replay import CheckConfig, ReceiptChecker
from swarm.verification.witness import ReceiptCollector, ServerWitness, WitnessConfig
from tests.training.swarm_harness import LiveNode, Swarm, small_run, stage_weights
from tests.verification.verif_helpers import DirectFetcher, MemoryStore, make_identity


def local_sgd_run(base: RunConfig | None = None, **averaging: object) -> RunConfig:
    run = base or small_run()
    settings = {"mode": "local_sgd", "inner_steps": 4, **averaging}
    return dataclasses.replace(run, averaging=dataclasses.replace(run.averaging, **settings))  # type: ignore[arg-type]


def anchor_of(node: LiveNode) -> list[torch.Tensor]:
    server = node.role.server
    assert server is not None
    with server.lock:
        return [v.clone() for k, v in sorted(server.extra_state.items()) if k.startswith(ANCHOR)]


def tied_copy(node: LiveNode) -> torch.Tensor:
    server = node.role.server
    assert server is not None
    index = tied_index(server)
    assert index is not None
    return server.parameter_copy(index)


async def finish(nodes: list[LiveNode], timeout_s: float = 90.0) -> None:
    async with asyncio.timeout(timeout_s):
        await asyncio.gather(*(n.task for n in nodes))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_node_joining_between_syncs_takes_part_in_the_next_one() -> None:
    swarm = Swarm(local_sgd_run(outer_compression="topk_q"))
    try:
        first = await swarm.add(seed=120, stage=0, max_steps=12)
        last = await swarm.add(seed=121, stage=1, max_steps=12)
        await swarm.wait_step([first, last], 5, timeout_s=60)  # past the sync closing step 3, before step 7's
        joiner = await swarm.add(seed=122, stage=0, max_steps=12)
        joined_at = joiner.role.server.step if joiner.role.server is not None else -1
        assert 4 <= joined_at <= 7, joined_at
        await finish([first, last, joiner])
        outer = joiner.trainer.stepper.outer
        assert outer is not None and outer.syncs >= 1  # it synced (steps 7 and 11) rather than waiting
        mine, theirs = anchor_of(first), anchor_of(joiner)
        assert len(mine) == len(theirs) > 0
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
        # the run ends on a sync (max_steps): both replicas hold the same weights, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(stage_weights(first), stage_weights(joiner), strict=True))
        # the tied embedding/head matrix, synced with the outer step: stage 0's copy is the last stage's
        assert torch.equal(tied_copy(first), tied_copy(last))
        # nobody re-downloaded a state: between syncs the replicas differ and that is no divergence
        assert first.role.state_age_steps == 12 and joiner.role.state_age_steps == 12 - joined_at
    finally:
        await swarm.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_sign_flipped_pseudo_gradient_is_reported_by_its_stage_peers() -> None:
    base = RunConfig.from_toml("tiny_gpt_robust")
    run = local_sgd_run(base, inner_steps=2, outer_compression="topk_q", outer_topk_fraction=0.1, outer_bits=4)
    swarm = Swarm(run)
    try:
        # 5 outer syncs: a sync whose group forms without one of the three (a slow joiner) inspects nothing of it
        steps = 10
        honest = [await swarm.add(seed=130 + i, stage=0, max_steps=steps) for i in range(2)]
        flip = Misbehaviour(MisbehaveConfig(kind="sign-flip"))
        flipper = await swarm.add(seed=132, stage=0, max_steps=steps, hooks=flip)
        last = await swarm.add(seed=133, stage=1, max_steps=steps)
        await finish([*honest, flipper, last])
        cheat = flipper.transport.peer_id
        for node in honest:
            assert node.trainer.checks.offenders() == frozenset({cheat})
        async with asyncio.timeout(10):  # the signed reports it published (the orchestrator flags on 2 reporters)
            for node in honest:
                await node.trainer.checks.gradients.flush()  # type: ignore[union-attr]
            windows = range(steps // run.verification.window_steps + 1)  # whichever window each caught it in
            reports = [await fetch_reports(honest[0].dht, run.run_id, w) for w in windows]
        reporters = {p for r in reports for p, rep in r.items() if cheat in {PeerID(e.peer) for e in rep.entries}}
        assert reporters == {n.transport.peer_id for n in honest}
    finally:
        await swarm.close()


RUN = RunConfig.from_dict(
    {
        "model": {"num_blocks": 2, "d_model": 32, "seq_len": 16},
        "pipeline": {"num_stages": 2},
        "averaging": {"mode": "local_sgd", "inner_steps": 8},
    }
)


def _servers(count: int) -> list[StageServer]:
    stage = build_stages(RUN)[1]
    servers = []
    for _ in range(count):
        model = build_stages(RUN)[1]
        model.load_state_dict(stage.state_dict())
        server = StageServer(
            model, make_optimizer(model.parameters(), RUN.optimizer), RUN.optimizer, StageServerConfig()
        )
        server.names_weights = True
        servers.append(server)
    return servers


@pytest.mark.slow
async def test_a_lazy_replica_is_flagged_while_the_replicas_differ() -> None:
    """Two stage-1 replicas trained on different microbatches for two inner steps (their weights differ), one
    lazy; every receipt names the weights that computed it and the validator replays with exactly those (found by
    their digest: it holds replica A's weights only as another peer's copy)."""
    stage0 = build_stages(RUN)[0]
    servers = _servers(2)
    ids = [make_identity("lsgd-a"), make_identity("lsgd-b")]
    driver, copy_of_a = make_identity("lsgd-driver"), make_identity("lsgd-copy")
    wcfg = WitnessConfig(run_id=RUN.run_id, window_steps=100)
    witnesses = [ServerWitness(i, wcfg) for i in ids]
    collector = ReceiptCollector(driver, wcfg, MemoryStore())
    lazy = Misbehaviour(MisbehaveConfig(kind="lazy"))
    policy, data = RUN.codecs.policy(), ShardedData(RUN, b"lsgd")
    replayer = StageReplayer(RUN, keep_steps=10)
    for step in range(3):
        for r, server in enumerate(servers):
            # the validator got replica A's weights from a copy of them (a peer that downloaded A's state), never
            # from A itself: only the digest its receipts name can point the replay at them
            holder = copy_of_a.peer_id if r == 0 else ids[r].peer_id
            state = capture_state(server.model, server.optimizer, run_id=RUN.run_id, stage=1, step=step)
            replayer.add_state(state, holder)
            for index in range(2):
                mb, mb_id = data.microbatch(step, 10 * r + index, num_samples=2), f"d/{step}/{r}/{index}"
                with torch.no_grad():
                    acts = stage0(mb.inputs)
                x1, targets = encode(acts, policy, Role.ACTIVATIONS), encode(mb.targets, policy, Role.ACTIVATIONS)
                _, grad = server.loss_backward(acts, mb.targets, step=step, microbatch_id=mb_id)
                assert grad is not None
                if r == 1:
                    grad = lazy.outputs("backward", grad)
                g = encode(grad, policy, Role.ACTIVATION_GRADS)
                work = dict(step=step, stage=1, microbatch_id=mb_id, kind="backward", inputs=[x1, targets], outputs=[g])
                weights = server.weights_digest_of(step)
                ack = witnesses[r].witness(caller=driver.peer_id, num_samples=2, weights=weights, **work)  # type: ignore[arg-type]
                collector.record(server=ids[r].peer_id, num_samples=2, ack=ack, weights=weights, **work)  # type: ignore[arg-type]
            server.close_step()
            server.apply_step(server.mean_gradients())  # an inner step: no all-reduce
    receipts = collector.pending()
    assert len(receipts) == 12 and all(r.problem() is None for r in receipts)
    named = {(r.claim.step, PeerID(r.claim.server)): r.claim.weights for r in receipts}
    assert all(len(w) == 32 for w in named.values())
    assert named[(2, ids[0].peer_id)] != named[(2, ids[1].peer_id)]  # the replicas differ at step 2
    checker = ReceiptChecker(
        make_identity("lsgd-v"),
        CheckConfig(sample_probability=1.0),
        replayer,
        DirectFetcher({i.peer_id: w.service for i, w in zip(ids, witnesses, strict=True)}),
        rng=random.Random(0),
    )
    verdicts = await checker.check_window(receipts, 0)
    assert len(verdicts) == 12
    assert {v.subject_id for v in verdicts if not v.passed} == {ids[1].peer_id}
    assert all(v.passed for v in verdicts if v.subject_id == ids[0].peer_id)
