"""The acceptance scenario in-process: 5 miners, a validator, an orchestrator; one miner cheats in each way.

Miners call each other's stand-in stage (`LinearStage`) over the receipt machinery (witness, collector),
average gradients with CenteredClip and report outliers; the validator samples receipts with p = 0.25 and
replays them; the orchestrator attests every window. Deterministic (seeded RNGs, an injected clock).
"""

from __future__ import annotations

import random

import pytest
import torch
from verif_helpers import DirectFetcher, LinearStage, MemoryStore, encode_tensor, make_identity

from swarm.p2p.identity import PeerID
from swarm.averaging.reducer import centered_clip
from swarm.testing.misbehave import MisbehaveConfig, Misbehaviour
from swarm.verification.attestation import fetch_attestations, pick_attestation, verify_attestation
from swarm.verification.election import ElectionConfig
from swarm.verification.orchestrator import Orchestrator, OrchestratorConfig
from swarm.verification.outliers import (
    OutlierConfig,
    ReplayDetector,
    fetch_reports,
    find_outliers,
    publish_report,
    sign_report,
)
from swarm.verification.receipts import fetch_receipts
from swarm.verification.replay import CheckConfig, ReceiptChecker
from swarm.verification.rewards import RewardConfig
from swarm.verification.verdicts import VerdictBatch, fetch_verdicts, publish_verdicts
from swarm.verification.witness import ReceiptCollector, ServerWitness, WitnessConfig

RUN = "run-sim"
WINDOW = 5
DIM = 16


class Miner:
    def __init__(self, index: int, kind: str | None) -> None:
        self.identity = make_identity(f"miner-{index}")
        self.peer_id = self.identity.peer_id
        cfg = WitnessConfig(run_id=RUN, window_steps=WINDOW)
        self.witness = ServerWitness(self.identity, cfg)
        self.misbehave = Misbehaviour(MisbehaveConfig(kind=kind, seed=index))
        self.collector: ReceiptCollector | None = None
        self.replays = ReplayDetector(OutlierConfig())
        self.findings: dict[int, list] = {}


def serve(
    server: Miner, caller: Miner, model: LinearStage, step: int, mb: str, x: torch.Tensor, g: torch.Generator
) -> None:
    """One forward and one backward of microbatch ``mb``: server computes (maybe cheating), caller signs receipts."""
    x_wire = [encode_tensor(x)]
    y = server.misbehave.outputs("forward", model.forward(0, step, x))
    y_wire = [encode_tensor(y, "float16")]
    ack = server.witness.witness(
        caller=caller.peer_id,
        step=step,
        stage=0,
        microbatch_id=mb,
        kind="forward",
        inputs=x_wire,
        outputs=y_wire,
        num_samples=x.shape[0],
    )
    caller.collector.record(
        server=server.peer_id,
        step=step,
        stage=0,
        microbatch_id=mb,
        kind="forward",
        inputs=x_wire,
        outputs=y_wire,
        num_samples=x.shape[0],
        ack=ack,
    )
    gy = torch.randn(x.shape, generator=g) * 0.01
    b_in = [*x_wire, encode_tensor(gy)]
    gx = server.misbehave.outputs("backward", model.backward(0, step, x, gy))
    b_out = [encode_tensor(gx, "float16")]
    ack = server.witness.witness(
        caller=caller.peer_id,
        step=step,
        stage=0,
        microbatch_id=mb,
        kind="backward",
        inputs=b_in,
        outputs=b_out,
        num_samples=x.shape[0],
    )
    caller.collector.record(
        server=server.peer_id,
        step=step,
        stage=0,
        microbatch_id=mb,
        kind="backward",
        inputs=b_in,
        outputs=b_out,
        num_samples=x.shape[0],
        ack=ack,
    )


async def average(miners: list[Miner], step: int, g: torch.Generator) -> None:
    """Every miner sends a gradient part; honest owners reduce with CenteredClip and note outliers/replays."""
    true = torch.randn(64, generator=g)
    parts = {m.peer_id: m.misbehave.gradients(step, [true + 0.5 * torch.randn(64, generator=g)])[0] for m in miners}
    center = centered_clip(list(parts.values()), [1.0] * len(parts), tau=1.0, iterations=20)
    for owner in miners:
        if owner.misbehave.kind is not None:
            continue
        found = find_outliers(parts, center, step, OutlierConfig())
        found += [e for p, v in parts.items() if (e := owner.replays.observe(p, "span-0", step, v)) is not None]
        owner.findings.setdefault(step // WINDOW, []).extend(found)


async def run_swarm(kind: str | None, num_steps: int = 30) -> tuple[dict[int, object], Miner | None, dict]:
    clock = {"now": 1000.0}
    store = MemoryStore(clock=lambda: clock["now"])
    model = LinearStage(DIM)
    miners = [Miner(i, kind if i == 2 else None) for i in range(5)]
    for m in miners:
        m.collector = ReceiptCollector(m.identity, WitnessConfig(run_id=RUN, window_steps=WINDOW), store)
    validator = make_identity("validator")
    fetcher = DirectFetcher({m.peer_id: m.witness.service for m in miners})
    checker = ReceiptChecker(validator, CheckConfig(sample_probability=0.25), model, fetcher, rng=random.Random(11))
    step_now = {"step": 0}
    orch = Orchestrator(
        make_identity("orchestrator"),
        OrchestratorConfig(
            run_id=RUN,
            election=ElectionConfig(),
            rewards=RewardConfig(window_steps=WINDOW),
            settle_steps=1,
            settle_s=0.0,
        ),
        store,
        lambda: step_now["step"],
        clock=lambda: clock["now"],
    )
    g = torch.Generator().manual_seed(5)
    rng = random.Random(3)
    work_done = {m.peer_id: 0 for m in miners}
    for step in range(num_steps):
        for caller in miners:
            for j in range(4):
                server = miners[rng.choice([i for i in range(5) if miners[i] is not caller])]
                rows = 1 + j % 3
                serve(
                    server,
                    caller,
                    model,
                    step,
                    f"{caller.peer_id.short()}-{step}-{j}",
                    torch.randn(rows, DIM, generator=g),
                    g,
                )
                work_done[server.peer_id] += rows * 3  # forward 1 + backward 2, per sample
            for forged in caller.misbehave.forged_receipts(
                caller.identity, run_id=RUN, step=step, stage=0, colluder=miners[0].peer_id if step % 2 else None
            ):
                caller.collector.add(forged)
        await average(miners, step, g)
        step_now["step"] = step + 1
        clock["now"] += 1.0
        if (step + 1) % WINDOW == 0:
            window = step // WINDOW
            for m in miners:
                await m.collector.flush(step + 1, now=clock["now"])
                if m.findings.get(window):
                    await publish_report(
                        store, sign_report(m.identity, run_id=RUN, window=window, entries=m.findings[window]), 1e9
                    )
            receipts = [r for b in (await fetch_receipts(store, RUN, window)).values() for r in b.receipts]
            verdicts = await checker.check_window(receipts, window)
            await publish_verdicts(
                store,
                VerdictBatch(run_id=RUN, window=window, publisher=validator.peer_id.to_bytes(), verdicts=verdicts),
                1e9,
            )
        await orch.tick()
    accepted = {}
    prev = None
    for window in range(num_steps // WINDOW - 1):
        att = pick_attestation(await fetch_attestations(store, RUN, window), RUN, window)
        problems = verify_attestation(
            att,
            run_id=RUN,
            window=window,
            prev=prev,
            receipts=await fetch_receipts(store, RUN, window),
            verdicts=await fetch_verdicts(store, RUN, window),
            reports=await fetch_reports(store, RUN, window),
        )
        assert problems == []
        accepted[window] = prev = att
    cheater = miners[2] if kind is not None else None
    return accepted, cheater, {"miners": miners, "work": work_done, "store": store}


async def test_honest_swarm_flags_nobody_and_pays_by_work():
    accepted, _, _info = await run_swarm(None)
    assert len(accepted) == 5
    for att in accepted.values():
        assert att.flagged == []
        shares = att.share_map()
        assert sum(shares.values()) == pytest.approx(1.0)
        work = {PeerID(e.peer): e.work for e in att.shares}
        for peer, share in shares.items():
            assert share == pytest.approx(work[peer] / sum(work.values()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["noisy-forward", "lazy", "sign-flip", "forge-receipts", "replay"])
async def test_each_cheat_is_flagged_within_10_steps_and_paid_nothing_after(kind):
    accepted, cheater, _info = await run_swarm(kind)
    flagged_in = [w for w, att in accepted.items() if cheater.peer_id.to_bytes() in att.flagged]
    assert flagged_in and flagged_in[0] * WINDOW + WINDOW <= 10, f"{kind} flagged in windows {flagged_in}"
    first = flagged_in[0]
    for window, att in accepted.items():
        shares = att.share_map()
        if window >= first:
            assert shares.get(cheater.peer_id, 0.0) == 0.0
            assert cheater.peer_id.to_bytes() in att.flagged
        honest_flagged = [PeerID(p) for p in att.flagged if p != cheater.peer_id.to_bytes()]
        assert honest_flagged == []
        work = {PeerID(e.peer): e.work for e in att.shares if PeerID(e.peer) != cheater.peer_id}
        paid = {p: s for p, s in shares.items() if p != cheater.peer_id}
        if window >= first:
            total = sum(work.values())
            for peer, share in paid.items():
                assert share == pytest.approx(work[peer] / total)
