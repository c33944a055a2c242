"""Validators' checks: sampling, fetch of retained work, hash checks, replay and comparison."""

from __future__ import annotations

import random

import pytest
import torch
from verif_helpers import DirectFetcher, LinearStage, encode_tensor, make_identity

from swarm.p2p.identity import Identity
from swarm.errors import ConfigError
from swarm.verification.common import digest_parts
from swarm.verification.compare import ToleranceConfig
from swarm.verification.receipts import WorkClaim, WorkReceipt, sign_ack, sign_receipt
from swarm.verification.replay import CheckConfig, ReceiptChecker
from swarm.verification.retention import FetchService, RetentionConfig, RetentionStore

RUN = "run-replay"
DIM = 16


class Server:
    """A stage server double that computes on batches of microbatches and retains wire payloads."""

    def __init__(self, identity: Identity, stage_model: LinearStage, misbehave: str | None = None) -> None:
        self.identity = identity
        self.model = stage_model
        self.misbehave = misbehave
        self.retention = RetentionStore(RetentionConfig(window_steps=1000, max_bytes=1 << 30))
        self.service = FetchService(RUN, self.retention)

    def serve(
        self, caller: Identity, step: int, kind: str, batch: list[list[bytes]], first_mb: int
    ) -> list[WorkReceipt]:
        """Serve microbatches as one batched computation, like a stage server does."""
        from verif_helpers import decode_tensor

        xs = [decode_tensor(parts[0]) for parts in batch]
        sizes = [x.shape[0] for x in xs]
        x = torch.cat(xs)
        if kind == "forward":
            out = self.model.forward(0, step, x)
        else:
            out = self.model.backward(0, step, x, torch.cat([decode_tensor(parts[1]) for parts in batch]))
        if self.misbehave == "noisy":
            out = out + 0.5 * out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
        elif self.misbehave == "lazy":
            out = torch.zeros_like(out)
        receipts = []
        for i, (parts, y) in enumerate(zip(batch, out.split(sizes), strict=False)):
            wire_out = [encode_tensor(y, "float16")]
            mb = f"mb-{first_mb + i}"
            self.retention.put(step=step, stage=0, microbatch_id=mb, kind=kind, inputs=parts, outputs=wire_out)
            claim = WorkClaim(
                run_id=RUN,
                step=step,
                stage=0,
                server=self.identity.peer_id.to_bytes(),
                caller=caller.peer_id.to_bytes(),
                microbatch_id=mb,
                kind=kind,
                input_hash=digest_parts(parts),
                output_hash=digest_parts(wire_out),
                num_samples=y.shape[0],
            )
            receipts.append(sign_receipt(caller, claim, sign_ack(self.identity, claim)))
        return receipts


def traffic(server: Server, caller: Identity, num_steps: int, per_step: int, seed: int) -> list[WorkReceipt]:
    g = torch.Generator().manual_seed(seed)
    receipts = []
    for step in range(num_steps):
        for kind in ("forward", "backward"):
            batch = []
            for _ in range(per_step):
                rows = int(torch.randint(1, 5, (1,), generator=g))
                parts = [encode_tensor(torch.randn(rows, DIM, generator=g))]
                if kind == "backward":
                    parts.append(encode_tensor(torch.randn(rows, DIM, generator=g) * 1e-3))
                batch.append(parts)
            receipts += server.serve(caller, step, kind, batch, first_mb=len(receipts))
    return receipts


def checker(server: Server, validator: Identity, p: float = 1.0, seed: int = 0) -> ReceiptChecker:
    fetcher = DirectFetcher({server.identity.peer_id: server.service})
    return ReceiptChecker(
        validator,
        CheckConfig(sample_probability=p, max_checks_per_window=5000),
        LinearStage(DIM),
        fetcher,
        rng=random.Random(seed),
    )


@pytest.mark.slow
async def test_honest_work_has_no_false_positive_in_1000_checks():
    server = Server(make_identity("server"), LinearStage(DIM))
    receipts = traffic(server, make_identity("caller"), num_steps=50, per_step=10, seed=1)
    assert len(receipts) == 1000
    verdicts = await checker(server, make_identity("validator")).check_window(receipts, window=0)
    assert len(verdicts) == 1000
    assert [v.reason for v in verdicts if not v.passed] == []
    assert all(v.is_valid() and v.subject_id == server.identity.peer_id for v in verdicts)


@pytest.mark.parametrize("misbehave, reason", [("noisy", "cosine"), ("lazy", "zero")])
async def test_cheating_outputs_fail(misbehave, reason):
    server = Server(make_identity("server"), LinearStage(DIM), misbehave=misbehave)
    receipts = traffic(server, make_identity("caller"), num_steps=2, per_step=5, seed=2)
    verdicts = await checker(server, make_identity("validator")).check_window(receipts, window=0)
    assert len(verdicts) == len(receipts) and not any(v.passed for v in verdicts)
    assert all(reason in v.reason for v in verdicts)


async def test_missing_altered_or_unreachable_retained_data_fails():
    server = Server(make_identity("server"), LinearStage(DIM))
    receipts = traffic(server, make_identity("caller"), num_steps=1, per_step=3, seed=3)
    validator = make_identity("validator")
    check = checker(server, validator)
    first = receipts[0].claim
    kept = server.retention.get(step=first.step, stage=0, microbatch_id=first.microbatch_id, kind=first.kind)
    server.retention.put(
        step=first.step,
        stage=0,
        microbatch_id=first.microbatch_id,
        kind=first.kind,
        inputs=kept.inputs,
        outputs=[encode_tensor(torch.ones(1, DIM))],
    )
    second = receipts[1].claim
    server.retention.put(
        step=second.step,
        stage=0,
        microbatch_id=second.microbatch_id,
        kind=second.kind,
        inputs=[encode_tensor(torch.ones(1, DIM))],
        outputs=[],
    )
    assert (await check.check(receipts[0], 0)).reason == "retained output does not match the receipt's output hash"
    assert (await check.check(receipts[1], 0)).reason == "retained input does not match the receipt's input hash"
    server.retention = RetentionStore(RetentionConfig())
    server.service.store = server.retention
    assert (await check.check(receipts[2], 0)).reason == "server has no retained data for this receipt"
    unreachable = ReceiptChecker(validator, CheckConfig(fetch_attempts=2), LinearStage(DIM), DirectFetcher({}))
    verdict = await unreachable.check(receipts[2], 0)
    assert not verdict.passed and unreachable.fetcher.calls == 2


async def test_unavailable_weights_give_no_verdict():
    server = Server(make_identity("server"), LinearStage(DIM))
    receipts = traffic(server, make_identity("caller"), num_steps=1, per_step=1, seed=4)
    check = ReceiptChecker(
        make_identity("validator"),
        CheckConfig(),
        LinearStage(DIM, available_steps=range(5, 9)),
        DirectFetcher({server.identity.peer_id: server.service}),
    )
    assert await check.check(receipts[0], 0) is None


def test_sampling_rate_and_invalid_receipts_are_never_sampled():
    server = Server(make_identity("server"), LinearStage(DIM))
    receipts = traffic(server, make_identity("caller"), num_steps=5, per_step=20, seed=5)
    chosen = checker(server, make_identity("v"), p=0.1, seed=7).sample(receipts * 10)
    assert 140 <= len(chosen) <= 260  # 2000 receipts, p = 0.1: about 200 (seeded)
    me = make_identity("me")
    claim = WorkClaim(
        **{**receipts[0].claim.__dict__, "server": me.peer_id.to_bytes(), "caller": me.peer_id.to_bytes()}
    )
    self_signed = sign_receipt(me, claim, sign_ack(me, claim))
    assert checker(server, make_identity("v"), p=1.0).sample([self_signed]) == []


def test_retention_window_evicts_old_steps_and_respects_the_byte_budget():
    store = RetentionStore(RetentionConfig(window_steps=2, max_bytes=4096))
    for step in range(5):
        store.put(step=step, stage=0, microbatch_id="a", kind="forward", inputs=[b"x" * 100], outputs=[b"y" * 100])
    assert len(store) == 2 and store.get(step=2, stage=0, microbatch_id="a", kind="forward") is None
    assert store.get(step=4, stage=0, microbatch_id="a", kind="forward").inputs == (b"x" * 100,)
    for i in range(30):
        store.put(step=5, stage=0, microbatch_id=f"b{i}", kind="forward", inputs=[b"x" * 200], outputs=[])
    assert store.size_bytes <= 4096


@pytest.mark.parametrize(
    "kwargs, field", [({"sample_probability": 1.5}, "sample_probability"), ({"fetch_attempts": 0}, "fetch_attempts")]
)
def test_check_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CheckConfig(**kwargs)
    with pytest.raises(ConfigError, match="min_cosine"):
        ToleranceConfig(min_cosine=2.0)


async def test_old_receipts_are_not_demanded_and_departed_servers_get_no_verdict():
    server = Server(make_identity("server"), LinearStage(DIM))
    receipts = traffic(server, make_identity("caller"), num_steps=4, per_step=2, seed=6)
    check = checker(server, make_identity("validator"))
    verdicts = await check.check_window(receipts, 0, min_step=2)
    assert len(verdicts) == sum(1 for r in receipts if r.claim.step >= 2) and all(v.passed for v in verdicts)

    async def absent(peer) -> bool:
        return False

    async def up(peer) -> bool:
        return True

    gone = ReceiptChecker(
        make_identity("validator"), CheckConfig(fetch_attempts=1), LinearStage(DIM), DirectFetcher({}), present=absent
    )
    assert await gone.check(receipts[0], 0) is None
    still_here = ReceiptChecker(
        make_identity("validator"), CheckConfig(fetch_attempts=1), LinearStage(DIM), DirectFetcher({}), present=up
    )
    assert not (await still_here.check(receipts[0], 0)).passed
