"""Work receipts: signatures, ids, self-signing, forging, batches in the DHT."""

from __future__ import annotations

import logging

import pytest
from verif_helpers import MemoryStore, make_identity

from swarm.p2p.identity import Identity
from swarm.errors import ProtocolError, VerificationError
from swarm.dht.keys import owner_subkey, part_subkey, receipts_key
from swarm.verification.batches import MAX_PART_BYTES
from swarm.verification.common import digest_parts
from swarm.verification.receipts import (
    ReceiptBatch,
    WorkClaim,
    WorkReceipt,
    fetch_receipts,
    forge_receipt,
    publish_receipts,
    sign_ack,
    sign_receipt,
)

RUN = "run-test"


def make_claim(server: Identity, caller: Identity, mb: str = "mb-0", step: int = 3, kind: str = "forward") -> WorkClaim:
    return WorkClaim(
        run_id=RUN,
        step=step,
        stage=1,
        server=server.peer_id.to_bytes(),
        caller=caller.peer_id.to_bytes(),
        microbatch_id=mb,
        kind=kind,
        input_hash=digest_parts([b"in", mb.encode()]),
        output_hash=digest_parts([b"out", mb.encode()]),
        num_samples=4,
    )


def honest_receipt(server: Identity, caller: Identity, **kw) -> WorkReceipt:
    claim = make_claim(server, caller, **kw)
    return sign_receipt(caller, claim, sign_ack(server, claim))


def test_receipt_round_trip_and_id(identities):
    server, caller = identities[:2]
    receipt = honest_receipt(server, caller)
    assert receipt.problem() is None
    again = WorkReceipt.unpack(receipt.pack())
    assert again == receipt and again.receipt_id == receipt.receipt_id and again.problem() is None
    other = honest_receipt(server, caller, mb="mb-1")
    assert other.receipt_id != receipt.receipt_id


def test_self_signed_receipt_counts_nothing(identities):
    me = identities[0]
    claim = make_claim(me, me)
    receipt = sign_receipt(me, claim, sign_ack(me, claim))
    assert receipt.problem() == "self-signed receipt: the caller is the server"


def test_caller_refuses_a_bad_ack(identities):
    server, caller, other = identities[:3]
    claim = make_claim(server, caller)
    with pytest.raises(VerificationError, match="ack that does not verify"):
        sign_receipt(caller, claim, other.sign(claim.ack_body()))
    with pytest.raises(VerificationError, match="not this node"):
        sign_ack(other, claim)


def test_forged_and_tampered_receipts_are_invalid(identities):
    server, caller, forger = identities[:3]
    claim = make_claim(server, forger)
    forged = forge_receipt(forger, claim, forger.sign(claim.ack_body()))
    assert forged.problem() == "server ack signature does not verify"
    receipt = honest_receipt(server, caller)
    tampered = WorkReceipt(
        claim=WorkClaim(**{**receipt.claim.__dict__, "num_samples": 400}),
        server_signature=receipt.server_signature,
        caller_signature=receipt.caller_signature,
    )
    assert tampered.problem() == "caller signature does not verify"


@pytest.mark.parametrize(
    "wire, match",
    [
        (b"\xc1", "malformed msgpack"),
        ({"claim": {}, "server_signature": b"", "caller_signature": b""}, "missing field"),
    ],
)
def test_malformed_receipt_bytes_raise_protocol_error(wire, match):
    from swarm.p2p.messages import packb

    with pytest.raises(ProtocolError, match=match):
        WorkReceipt.unpack(wire if isinstance(wire, bytes) else packb(wire))


def test_claim_range_checks():
    a, b = make_identity("a"), make_identity("b")
    wire = make_claim(a, b).to_wire()
    for field, bad in (("kind", "sideways"), ("num_samples", 0), ("input_hash", b"short"), ("server", b"x" * 38)):
        with pytest.raises(ProtocolError):
            WorkClaim.from_wire({**wire, field: bad})


async def test_batches_round_trip_through_the_store(identities, memory_store: MemoryStore, caplog):
    server, caller, other = identities[:3]
    batch = ReceiptBatch(
        run_id=RUN,
        window=0,
        publisher=caller.peer_id.to_bytes(),
        receipts=[honest_receipt(server, caller, mb=f"mb-{i}") for i in range(3)],
    )
    assert await publish_receipts(memory_store, batch, expiration_time=100.0)
    # a copy of the caller's batch under another peer's subkey, a batch holding others' receipts, and garbage:
    key = receipts_key(RUN, 0)
    await memory_store.store(
        key,
        ReceiptBatch(**{**batch.__dict__, "receipts": batch.receipts[:1]}).pack(),
        100.0,
        subkey=owner_subkey(other.peer_id),
    )
    await memory_store.store(
        key,
        ReceiptBatch(run_id=RUN, window=0, publisher=server.peer_id.to_bytes(), receipts=batch.receipts).pack(),
        100.0,
        subkey=part_subkey(server.peer_id, 0),
    )
    await memory_store.store(key, b"\x93garbage", 100.0, subkey=owner_subkey(make_identity("x").peer_id))
    with caplog.at_level(logging.WARNING):
        got = await fetch_receipts(memory_store, RUN, 0)
    assert got == {caller.peer_id: batch}
    assert "not its own" in caplog.text and "another caller" in caplog.text and "malformed" in caplog.text


async def test_large_batches_are_split_into_parts_and_incomplete_ones_dropped(identities, caplog):
    server, caller = identities[:2]
    receipts = [honest_receipt(server, caller, mb=f"mb-{i}") for i in range(400)]
    batch = ReceiptBatch(run_id=RUN, window=2, publisher=caller.peer_id.to_bytes(), receipts=receipts)
    store = MemoryStore()
    assert await publish_receipts(store, batch, expiration_time=100.0)
    stored = store.data[receipts_key(RUN, 2)]
    assert len(stored) > 1 and all(len(v.value) <= MAX_PART_BYTES for v in stored.values())
    got = await fetch_receipts(store, RUN, 2)
    assert got[caller.peer_id].receipts == receipts and got[caller.peer_id].digest == batch.digest
    del stored[part_subkey(caller.peer_id, 1)]
    with caplog.at_level(logging.WARNING):
        assert await fetch_receipts(store, RUN, 2) == {}
    assert "incomplete" in caplog.text
