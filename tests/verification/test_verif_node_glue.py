"""The node glue: the real stage models replayed by `StageReplayer`, misbehaviour hooks, launcher helpers."""

from __future__ import annotations

import random

import pytest
import torch
from verif_helpers import DirectFetcher, MemoryStore, make_identity

from swarm.compression import Role
from swarm.training.checkpoint import capture_state
from swarm.run.config import RunConfig
from swarm.data import ShardedData
from swarm.errors import ConfigError
from swarm.testing.misbehave import MisbehaveConfig, Misbehaviour, hooks_for, misbehave_args, parse_misbehave_spec
from swarm.training.hooks import HONEST
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stages
from swarm.training.stage_rpc import encode
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.replayer import StageReplayer
from swarm.training.verifying import rewards_summary
from swarm.verification.attestation import GENESIS_DIGEST, build_attestation
from swarm.verification.ledger import Ledger
from swarm.verification.replay import CheckConfig, ReceiptChecker
from swarm.verification.rewards import RewardConfig, compute_rewards
from swarm.verification.witness import ReceiptCollector, ServerWitness, WitnessConfig

RUN = RunConfig.from_dict(
    {
        "model": {"num_blocks": 2, "d_model": 32, "seq_len": 16},
        "pipeline": {"num_stages": 2},
        "codecs": {"activations": "fp16"},
    }
)


def pipeline_traffic(misbehave: str | None, num_steps: int, per_step: int):
    """A driver with its own stage 0 and a stage-1 server, through the run's codecs, with receipts for both
    (stage 0's as upstream work signed by the stage-1 server). Returns receipts, services, states."""
    stages = build_stages(RUN)
    servers = [
        StageServer(m, make_optimizer(m.parameters(), RUN.optimizer), RUN.optimizer, StageServerConfig(max_batch=64))
        for m in stages
    ]
    policy = RUN.codecs.policy()
    driver, s1 = make_identity("glue-driver"), make_identity("glue-s1")
    wcfg = WitnessConfig(run_id=RUN.run_id, window_steps=100)
    w_driver, w_s1 = ServerWitness(driver, wcfg), ServerWitness(s1, wcfg)
    c_driver, c_s1 = ReceiptCollector(driver, wcfg, MemoryStore()), ReceiptCollector(s1, wcfg, MemoryStore())
    cheat = Misbehaviour(MisbehaveConfig(kind=misbehave))
    data = ShardedData(RUN, b"glue")
    states = []
    for step in range(num_steps):
        states += [
            (capture_state(s.model, s.optimizer, run_id=RUN.run_id, stage=i, step=step), (driver, s1)[i].peer_id)
            for i, s in enumerate(servers)
        ]
        for index in range(per_step):
            mb, mb_id = data.microbatch(step, index, num_samples=2), f"d/{step}/{index}"
            x0 = encode(mb.inputs, policy, Role.ACTIVATIONS)
            acts = cheat.outputs("forward", servers[0].forward(mb.inputs, step=step, microbatch_id=mb_id))
            x1 = encode(acts, policy, Role.ACTIVATIONS)
            upstream = w_driver.upstream(
                next_server=s1.peer_id,
                step=step,
                stage=0,
                microbatch_id=mb_id,
                inputs=[x0],
                outputs=[x1],
                num_samples=2,
            )
            c_s1.record_upstream(server=driver.peer_id, step=step, upstream=upstream, received=[x1])
            targets = encode(mb.targets, policy, Role.ACTIVATIONS)
            _, grad = servers[1].loss_backward(acts.float(), mb.targets, step=step, microbatch_id=mb_id)
            g = encode(grad, policy, Role.ACTIVATION_GRADS)
            ack = w_s1.witness(
                caller=driver.peer_id,
                step=step,
                stage=1,
                microbatch_id=mb_id,
                kind="backward",
                inputs=[x1, targets],
                outputs=[g],
                num_samples=2,
            )
            c_driver.record(
                server=s1.peer_id,
                step=step,
                stage=1,
                microbatch_id=mb_id,
                kind="backward",
                inputs=[x1, targets],
                outputs=[g],
                num_samples=2,
                ack=ack,
            )
        for server in servers:
            server.close_step()
            server.apply_step(server.mean_gradients())
    receipts = c_driver.pending() + c_s1.pending()
    return receipts, {driver.peer_id: w_driver.service, s1.peer_id: w_s1.service}, states, (driver, s1)


async def test_real_stages_replay_without_false_positives_and_catch_a_lazy_stage0():
    receipts, services, states, (driver, _s1) = pipeline_traffic(None, num_steps=3, per_step=6)
    assert {r.claim.stage for r in receipts} == {0, 1} and all(r.problem() is None for r in receipts)
    replayer = StageReplayer(RUN, keep_steps=10)
    for state, peer in states:
        replayer.add_state(state, peer)
    checker = ReceiptChecker(
        make_identity("glue-v"),
        CheckConfig(sample_probability=1.0),
        replayer,
        DirectFetcher(services),
        rng=random.Random(0),
    )
    verdicts = await checker.check_window(receipts, 0)
    assert len(verdicts) == len(receipts) == 36
    assert [v.reason for v in verdicts if not v.passed] == []

    receipts, services, states, (driver, _s1) = pipeline_traffic("lazy", num_steps=1, per_step=4)
    replayer = StageReplayer(RUN, keep_steps=10)
    for state, peer in states:
        replayer.add_state(state, peer)
    checker = ReceiptChecker(
        make_identity("glue-v"),
        CheckConfig(sample_probability=1.0),
        replayer,
        DirectFetcher(services),
        rng=random.Random(0),
    )
    verdicts = await checker.check_window(receipts, 0)
    failed = {v.subject_id for v in verdicts if not v.passed}
    assert failed == {driver.peer_id}


def test_misbehaviour_hooks():
    honest = Misbehaviour(MisbehaveConfig())
    x = torch.randn(4, 8)
    assert honest.outputs("forward", x) is x and honest.gradients(0, [x])[0] is x
    assert torch.equal(Misbehaviour(MisbehaveConfig(kind="lazy")).outputs("backward", x), torch.zeros_like(x))
    noisy = Misbehaviour(MisbehaveConfig(kind="noisy-forward")).outputs("forward", x)
    assert float(torch.nn.functional.cosine_similarity(noisy.flatten(), x.flatten(), dim=0)) < 0.99
    assert torch.equal(Misbehaviour(MisbehaveConfig(kind="sign-flip")).gradients(0, [x])[0], x * -1000.0)
    replay = Misbehaviour(MisbehaveConfig(kind="replay"))
    assert torch.equal(replay.gradients(0, [torch.zeros(4, 8)])[0], torch.zeros(4, 8))  # nothing served yet
    first = replay.gradients(0, [x])[0]
    assert torch.equal(replay.gradients(1, [torch.randn(4, 8)])[0], first)
    moved = [torch.randn(3, 5), torch.randn(5)]  # the replayer moved to a stage with other parameters
    assert replay.gradients(2, moved) is moved and torch.equal(
        replay.gradients(3, [torch.randn(3, 5), torch.randn(5)])[1], moved[1]
    )
    forger = make_identity("forger")
    forged = Misbehaviour(MisbehaveConfig(kind="forge-receipts")).forged_receipts(forger, run_id="r", step=1, stage=0)
    assert forged and all(r.problem() is not None for r in forged)
    assert parse_misbehave_spec("lazy:2") == ("lazy", 2) and parse_misbehave_spec("replay") == ("replay", 1)
    for bad in ("nope:1", "lazy:0", "lazy:x"):
        with pytest.raises(ConfigError):
            parse_misbehave_spec(bad)
    assert misbehave_args(5, (("lazy", 1), ("replay", 1))) == {4: ("--misbehave", "lazy"), 3: ("--misbehave", "replay")}


def test_node_hooks_honest_default_and_injected_misbehaviour():
    """The product sees only `NodeHooks`: the honest default changes nothing; the node injects `Misbehaviour`."""
    x = torch.randn(4, 8)
    me = make_identity("hooks")
    assert HONEST.stage_outputs("forward", x) is x and HONEST.gradients_to_average(0, [x])[0] is x
    assert HONEST.extra_receipts(me, run_id="r", step=0, stage=0) == []
    assert HONEST.label is None and HONEST.rebalances
    assert hooks_for(None) is HONEST and hooks_for(MisbehaveConfig()) is HONEST
    lazy = hooks_for(MisbehaveConfig(kind="lazy"))
    assert isinstance(lazy, Misbehaviour) and lazy.label == "lazy" and not lazy.rebalances
    assert torch.equal(lazy.stage_outputs("backward", x), torch.zeros_like(x))
    flip = hooks_for(MisbehaveConfig(kind="sign-flip"))
    assert torch.equal(flip.gradients_to_average(0, [x])[0], x * -1000.0)
    forger = hooks_for(MisbehaveConfig(kind="forge-receipts"))
    first = forger.extra_receipts(me, run_id="r", step=1, stage=0)
    assert len(first) == MisbehaveConfig().forged_per_flush and all(r.problem() is not None for r in first)
    assert forger.extra_receipts(me, run_id="r", step=1, stage=0) == []  # once per step
    assert len(forger.extra_receipts(me, run_id="r", step=2, stage=0)) == len(first)
    assert lazy.extra_receipts(me, run_id="r", step=1, stage=0) == []


def test_rewards_summary_from_ledgers(tmp_path):
    a, caller, o1, o2 = (make_identity(n) for n in ("rs-a", "rs-c", "rs-o1", "rs-o2"))
    from swarm.verification.common import digest_parts
    from swarm.verification.receipts import ReceiptBatch, WorkClaim, sign_ack, sign_receipt

    claim = WorkClaim(
        run_id="r",
        step=1,
        stage=0,
        server=a.peer_id.to_bytes(),
        caller=caller.peer_id.to_bytes(),
        microbatch_id="m",
        kind="forward",
        input_hash=digest_parts([b"i"]),
        output_hash=digest_parts([b"o"]),
        num_samples=1,
    )
    batch = {
        caller.peer_id: ReceiptBatch(
            run_id="r",
            window=0,
            publisher=caller.peer_id.to_bytes(),
            receipts=[sign_receipt(caller, claim, sign_ack(a, claim))],
        )
    }
    out = compute_rewards("r", 0, batch, {}, [], RewardConfig())
    for orch, name in ((o1, "l1"), (o2, "l2")):  # two orchestrators attested window 0: one is accepted
        att = build_attestation(
            orch,
            run_id="r",
            window=0,
            term=1,
            cfg=RewardConfig(),
            outcome=out,
            receipts=batch,
            verdicts={},
            prev_digest=GENESIS_DIGEST,
            issued_at=1.0,
        )
        Ledger(tmp_path / name).append(att)
    summary = rewards_summary([tmp_path / "l1", tmp_path / "l2", tmp_path / "missing"], "r")
    assert (
        summary["rewards"] == {a.peer_id.to_base58(): 1.0} and summary["attestations"] == 1 and summary["flagged"] == []
    )


def test_replayer_uses_the_checked_servers_own_weights():
    from swarm.verification.replay import ReplayUnavailableError

    stages = build_stages(RUN)
    opt = make_optimizer(stages[1].parameters(), RUN.optimizer)
    a, b, c = (make_identity(n).peer_id for n in ("w-a", "w-b", "w-c"))
    state_a = capture_state(stages[1], opt, run_id=RUN.run_id, stage=1, step=3)
    drifted = {k: (v + 0.1 if k.startswith("param.") else v) for k, v in state_a.tensors.items()}
    state_b = type(state_a)(run_id=RUN.run_id, stage=1, step=3, tensors=drifted)
    replayer = StageReplayer(RUN, keep_steps=4)
    replayer.add_state(state_a, a)
    replayer.add_state(state_b, b)
    x = [encode(torch.randn(2, RUN.model.seq_len, RUN.model.d_model), RUN.codecs.policy(), Role.ACTIVATIONS)]
    out_a = replayer.recompute(stage=1, step=3, kind="forward", inputs=x, server=a)[0]
    out_b = replayer.recompute(stage=1, step=3, kind="forward", inputs=x, server=b)[0]
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ReplayUnavailableError, match="not downloaded"):
        replayer.recompute(stage=1, step=3, kind="forward", inputs=x, server=c)
    replayer.refused.add((1, 3, c))
    with pytest.raises(ReplayUnavailableError, match="two replicas agree on"):  # a and b differ
        replayer.recompute(stage=1, step=3, kind="forward", inputs=x, server=c)
    lonely = StageReplayer(RUN, keep_steps=4)  # one other replica is no agreement: it may have diverged itself
    lonely.add_state(state_b, b)
    lonely.refused.add((1, 3, c))
    with pytest.raises(ReplayUnavailableError, match="two replicas agree on"):
        lonely.recompute(stage=1, step=3, kind="forward", inputs=x, server=c)
    agreed = StageReplayer(RUN, keep_steps=4)
    agreed.add_state(state_a, a)
    agreed.add_state(state_a, make_identity("w-d").peer_id)
    agreed.refused.add((1, 3, c))
    assert torch.equal(agreed.recompute(stage=1, step=3, kind="forward", inputs=x, server=c)[0], out_a)


async def test_node_verification_publishes_receipts_forges_and_attests(tmp_path):
    import asyncio

    from swarm.training.verifying import NodeVerification, node_verification_config
    from swarm.verification.attestation import fetch_attestations
    from swarm.verification.receipts import fetch_receipts
    from swarm.verification.settings import VerificationSettings

    store = MemoryStore(clock=lambda: 0.0)
    settings = VerificationSettings(window_steps=2, settle_steps=0)
    me = make_identity("nv-forger")
    cfg = node_verification_config(orchestrator_candidate=True, data_dir=tmp_path, run_id="r")
    cfg = type(cfg)(**{**cfg.__dict__, "tick_s": 0.01})
    forger = Misbehaviour(MisbehaveConfig(kind="forge-receipts"))
    node = NodeVerification(settings, cfg, run_id="r", identity=me, dht=store, hooks=forger)
    node.orchestrator.cfg = type(node.orchestrator.cfg)(**{**node.orchestrator.cfg.__dict__, "settle_s": 0.0})
    step = {"now": 0}
    task = asyncio.create_task(node.run(lambda: step["now"], lambda: 0))
    try:
        async with asyncio.timeout(10):
            for now in (0, 1):
                step["now"] = now
                while now not in forger._forged_steps:
                    await asyncio.sleep(0.01)
            step["now"] = 3
            while node.orchestrator.next_window < 1:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    batches = await fetch_receipts(store, "r", 0)
    assert len(batches[me.peer_id].receipts) == 2 * MisbehaveConfig().forged_per_flush
    [att] = await fetch_attestations(store, "r", 0)
    assert att.flagged == [me.peer_id.to_bytes()] and node.summary().attested_windows == [0]
    assert Ledger(cfg.ledger_path).read() == [att]
