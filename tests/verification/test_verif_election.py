"""Election and orchestration: deterministic leader, takeover after the leader dies, every window once."""

from __future__ import annotations

import asyncio

import pytest
from verif_helpers import MemoryStore, make_identity

from swarm.errors import ConfigError
from swarm.verification.attestation import fetch_attestations, leader_rank, pick_attestation, verify_attestation
from swarm.verification.election import (
    ElectionConfig,
    Heartbeat,
    choose_leader,
    fetch_heartbeats,
    live_candidates,
    publish_heartbeat,
    sign_heartbeat,
)
from swarm.verification.orchestrator import Orchestrator, OrchestratorConfig
from swarm.verification.receipts import (
    ReceiptBatch,
    WorkClaim,
    publish_receipts,
    sign_ack,
    sign_receipt,
    fetch_receipts,
)
from swarm.verification.common import digest_parts
from swarm.verification.rewards import RewardConfig
from swarm.verification.verdicts import fetch_verdicts

RUN = "run-elect"
ELECTION = ElectionConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_leader_rule_is_deterministic_and_skips_dead_candidates():
    ids = [make_identity(f"cand-{i}") for i in range(4)]
    beats = [sign_heartbeat(c, run_id=RUN, role="candidate", now=100.0, cfg=ELECTION) for c in ids]
    ranked = sorted((c.peer_id for c in ids), key=lambda p: leader_rank(RUN, p))
    assert choose_leader(beats, RUN, 101.0) == ranked[0] == choose_leader(list(reversed(beats)), RUN, 101.0)
    fresh = [
        sign_heartbeat(c, run_id=RUN, role="candidate", now=104.0, cfg=ELECTION) for c in ids if c.peer_id != ranked[0]
    ]
    assert live_candidates(beats + fresh, RUN, 106.0) == ranked[1:]
    assert choose_leader(beats, RUN, 200.0) is None
    forged = Heartbeat(**{**beats[0].__dict__, "expires_at": 10_000.0})
    assert not forged.is_live(300.0)


async def test_heartbeats_round_trip_and_bad_records_are_dropped(caplog):
    store = MemoryStore(clock=lambda: 100.0)
    a, b = make_identity("a"), make_identity("b")
    hb = sign_heartbeat(a, run_id=RUN, role="validator", now=100.0, cfg=ELECTION)
    await publish_heartbeat(store, hb)
    await store.store(f"{RUN}/orchestrator", hb.pack(), 105.0, subkey=f"[owner:{b.peer_id.to_base58()}]")
    await store.store(f"{RUN}/orchestrator", b"\xff\xff", 105.0, subkey="[owner:x]")
    assert await fetch_heartbeats(store, RUN) == [hb]
    assert "malformed heartbeat" in caplog.text


def test_configs_name_the_bad_field():
    with pytest.raises(ConfigError, match="heartbeat_ttl_s"):
        ElectionConfig(heartbeat_interval_s=2.0, heartbeat_ttl_s=1.0)
    with pytest.raises(ConfigError, match="role"):
        OrchestratorConfig(run_id=RUN, role="king")


async def publish_window_receipts(store: MemoryStore, window: int, server, caller) -> None:
    receipts = []
    for step in range(window * 5, window * 5 + 5):
        claim = WorkClaim(
            run_id=RUN,
            step=step,
            stage=0,
            server=server.peer_id.to_bytes(),
            caller=caller.peer_id.to_bytes(),
            microbatch_id=f"mb-{step}",
            kind="forward",
            input_hash=digest_parts([b"i"]),
            output_hash=digest_parts([b"o"]),
            num_samples=2,
        )
        receipts.append(sign_receipt(caller, claim, sign_ack(server, claim)))
    await publish_receipts(
        store, ReceiptBatch(run_id=RUN, window=window, publisher=caller.peer_id.to_bytes(), receipts=receipts), 1e12
    )


async def test_leader_killed_mid_run_next_attests_within_expiry_and_every_window_once(tmp_path):
    clock = Clock()
    store = MemoryStore(clock=clock)
    cands = [make_identity(f"orch-{i}") for i in range(3)]
    step = {"now": 0}
    cfg = dict(
        run_id=RUN, election=ELECTION, rewards=RewardConfig(window_steps=5), settle_steps=1, settle_s=0.0, tick_s=0.5
    )
    orchs = {
        c.peer_id: Orchestrator(
            c,
            OrchestratorConfig(**cfg, ledger_path=str(tmp_path / f"{c.peer_id.short()}.jsonl")),
            store,
            lambda: step["now"],
            clock=clock,
        )
        for c in cands
    }
    ranked = sorted(orchs, key=lambda p: leader_rank(RUN, p))
    server, caller = make_identity("server"), make_identity("caller")
    alive = set(orchs)
    killed_at, first_after_kill = None, None
    for tick in range(200):  # 100 s of simulated time, one step per second
        clock.now += 0.5
        if tick % 2 == 0:
            step["now"] += 1
            if step["now"] % 5 == 0:
                await publish_window_receipts(store, step["now"] // 5 - 1, server, caller)
        if tick == 80:
            alive.discard(ranked[0])
            killed_at = clock.now
        for peer in sorted(alive):
            signed = await orchs[peer].tick()
            if signed and killed_at is not None and first_after_kill is None and peer != ranked[0]:
                first_after_kill = clock.now
    assert killed_at is not None and first_after_kill is not None
    assert first_after_kill - killed_at <= ELECTION.heartbeat_ttl_s + 3.0
    signed = [a for o in orchs.values() for a in o.signed]
    windows = sorted(a.window for a in signed)
    last_closed = (step["now"] - 1) // 5 - 1
    assert windows == list(range(last_closed + 1))  # every window exactly once
    assert {a.orchestrator_id for a in signed} == {ranked[0], ranked[1]}
    prev = None
    for window in range(last_closed + 1):
        att = pick_attestation(await fetch_attestations(store, RUN, window), RUN, window)
        receipts, verdicts = await fetch_receipts(store, RUN, window), await fetch_verdicts(store, RUN, window)
        assert verify_attestation(att, run_id=RUN, window=window, prev=prev, receipts=receipts, verdicts=verdicts) == []
        assert att.term == (1 if att.orchestrator_id == ranked[0] else 2)
        prev = att
    ledgered = orchs[ranked[1]].ledger.read()
    assert [a.window for a in ledgered] == [a.window for a in orchs[ranked[1]].signed] and ledgered


async def test_background_loop_starts_and_stops():
    store = MemoryStore(clock=lambda: 0.0)
    orch = Orchestrator(
        make_identity("solo"),
        OrchestratorConfig(
            run_id=RUN,
            election=ELECTION,
            tick_s=0.01,
            rewards=RewardConfig(window_steps=1),
            settle_steps=0,
            settle_s=0.0,
        ),
        store,
        lambda: 3,
        clock=lambda: 0.0,
    )
    await orch.start()
    async with asyncio.timeout(5):
        while orch.next_window < 3:
            await asyncio.sleep(0.01)
    await orch.stop()
    assert [a.window for a in orch.signed] == [0, 1, 2]


async def test_orchestrator_waits_settle_s_and_its_own_validator():
    clock = Clock()
    store = MemoryStore(clock=clock)
    checked = {"upto": 0}
    orch = Orchestrator(
        make_identity("waiter"),
        OrchestratorConfig(
            run_id=RUN, election=ELECTION, settle_s=3.0, rewards=RewardConfig(window_steps=1), settle_steps=0
        ),
        store,
        lambda: 5,
        clock=clock,
        window_ready=lambda w: w < checked["upto"],
    )
    assert await orch.tick() == []  # window 0 just closed: settle_s not over
    clock.now += 3.5
    assert await orch.tick() == []  # settled, but its validator has not checked window 0
    checked["upto"] = 2
    assert [a.window for a in await orch.tick()] == [0, 1]
