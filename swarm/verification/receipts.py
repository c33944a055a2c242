"""Work receipts: the server acknowledges a result, the caller signs a receipt for it.

A receipt records one forward or backward a server computed for a caller: run, step, stage, both PeerIDs,
the microbatch id, the SHA-256 of the input and output wire payloads, the number of samples and the SHA-256
of the server's weights that computed it (``weights``: replicas of a stage differ between the outer syncs of
local_sgd mode, so a validator replays with exactly the weights the receipt names). The server
signs the facts (its *ack*, returned with the result); the caller checks the ack and the output hash, then
signs the whole receipt. A receipt counts only when both signatures are valid and the caller is not the
server, so a node cannot raise its own count, and a caller cannot invent work an honest server never
acknowledged (which would get that server flagged when a validator asks for the retained data).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from swarm.p2p.identity import SIGNATURE_SIZE_BYTES, Identity, PeerID
from swarm.p2p.messages import Message
from swarm.errors import VerificationError
from swarm.dht.keys import RECEIPTS, receipts_key
from swarm.verification.batches import batch_schema, merge_batches, publish_batch
from swarm.verification.common import RecordStore, check_digest, peer_from_bytes, signing_body

log = logging.getLogger(__name__)

KINDS = ("forward", "backward")
_ACK_DOMAIN = b"swarm/work-ack/v1\x00"
_RECEIPT_DOMAIN = b"swarm/receipt/v1\x00"
MAX_ID_CHARS = 128


@dataclass(frozen=True, kw_only=True)
class WorkClaim(Message):
    """The facts of one served microbatch (what both parties sign)."""

    run_id: str
    step: int
    stage: int
    server: bytes
    caller: bytes
    microbatch_id: str
    kind: str
    input_hash: bytes
    output_hash: bytes
    num_samples: int
    weights: bytes = b""  # SHA-256 of the server's weights that computed it (`weights_digest`); b"": not named

    def __post_init__(self) -> None:
        if not 0 < len(self.run_id) <= MAX_ID_CHARS or not 0 < len(self.microbatch_id) <= MAX_ID_CHARS:
            raise ValueError(f"run_id and microbatch_id must have 1..{MAX_ID_CHARS} characters")
        if self.step < 0 or self.stage < 0:
            raise ValueError(f"step and stage must be >= 0, got step={self.step} stage={self.stage}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not 1 <= self.num_samples <= 1 << 20:
            raise ValueError(f"num_samples must be in [1, 2**20], got {self.num_samples}")
        check_digest(self.input_hash, "input_hash")
        check_digest(self.output_hash, "output_hash")
        if self.weights:
            check_digest(self.weights, "weights")
        peer_from_bytes(self.server, "server")
        peer_from_bytes(self.caller, "caller")

    @property
    def server_id(self) -> PeerID:
        return PeerID(self.server)

    @property
    def caller_id(self) -> PeerID:
        return PeerID(self.caller)

    def ack_body(self) -> bytes:
        """The bytes the server's ack signature covers."""
        return signing_body(_ACK_DOMAIN, self.to_wire())


def sign_ack(identity: Identity, claim: WorkClaim) -> bytes:
    """Server side: acknowledge that this node computed ``claim`` (returned to the caller with the result)."""
    if claim.server_id != identity.peer_id:
        raise VerificationError(f"claim names server {claim.server_id.short()}, not this node; refusing to ack")
    return identity.sign(claim.ack_body())


@dataclass(frozen=True, kw_only=True)
class WorkReceipt(Message):
    """A claim with the server's ack and the caller's signature over both."""

    claim: WorkClaim
    server_signature: bytes
    caller_signature: bytes

    def __post_init__(self) -> None:
        for name in ("server_signature", "caller_signature"):
            if len(getattr(self, name)) != SIGNATURE_SIZE_BYTES:
                raise ValueError(f"{name} must have {SIGNATURE_SIZE_BYTES} bytes")

    def receipt_body(self) -> bytes:
        return signing_body(_RECEIPT_DOMAIN, {"claim": self.claim.to_wire(), "ack": self.server_signature})

    @property
    def receipt_id(self) -> bytes:
        """A stable id: SHA-256 of the caller-signed body (independent of the caller's signature bytes)."""
        return hashlib.sha256(self.receipt_body()).digest()

    def problem(self) -> str | None:
        """Why this receipt counts nothing (bad signature, self-signed), or None if it is valid."""
        claim = self.claim
        if claim.server == claim.caller:
            return "self-signed receipt: the caller is the server"
        if not claim.caller_id.verify(self.caller_signature, self.receipt_body()):
            return "caller signature does not verify"
        if not claim.server_id.verify(self.server_signature, claim.ack_body()):
            return "server ack signature does not verify"
        return None


def sign_receipt(identity: Identity, claim: WorkClaim, server_signature: bytes) -> WorkReceipt:
    """Caller side: check the server's ack, then sign the receipt. VerificationError if the ack is bad."""
    if claim.caller_id != identity.peer_id:
        raise VerificationError(f"claim names caller {claim.caller_id.short()}, not this node")
    if not claim.server_id.verify(server_signature, claim.ack_body()):
        raise VerificationError(
            f"server {claim.server_id.short()} sent an ack that does not verify; no receipt signed for it"
        )
    body = WorkReceipt(claim=claim, server_signature=server_signature, caller_signature=bytes(64)).receipt_body()
    return WorkReceipt(claim=claim, server_signature=server_signature, caller_signature=identity.sign(body))


def forge_receipt(identity: Identity, claim: WorkClaim, server_signature: bytes) -> WorkReceipt:
    """Sign a receipt without checking the ack (what a forger does; used by `swarm/testing/misbehave.py` and tests)."""
    body = WorkReceipt(claim=claim, server_signature=server_signature, caller_signature=bytes(64)).receipt_body()
    return WorkReceipt(claim=claim, server_signature=server_signature, caller_signature=identity.sign(body))


@dataclass(frozen=True, kw_only=True)
class ReceiptBatch(Message):
    """The receipts one caller signed in one window, published under ``{run}/receipts/{window}``."""

    run_id: str
    window: int
    publisher: bytes
    receipts: list[WorkReceipt]
    part: int = 0
    num_parts: int = 1

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if not 0 <= self.part < self.num_parts <= 100_000:
            raise ValueError(f"part {self.part} of {self.num_parts} is out of range")
        peer_from_bytes(self.publisher, "publisher")

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.pack()).digest()


RECEIPTS_SCHEMA = batch_schema(RECEIPTS, ReceiptBatch)


async def publish_receipts(store: RecordStore, batch: ReceiptBatch, expiration_time: float) -> bool:
    """Store a caller's batch (in parts that fit a record) under its owner subkeys."""
    return await publish_batch(store, receipts_key(batch.run_id, batch.window), batch, "receipts", expiration_time)


def _check_receipt_batch(batch: ReceiptBatch) -> str | None:
    if any(r.claim.caller != batch.publisher for r in batch.receipts):
        return "it holds receipts another caller signed"
    return None


def parse_receipt_batches(result: object, run_id: str, window: int) -> dict[PeerID, ReceiptBatch]:
    """Whole batches by publisher from a DHT answer; malformed, mislabelled or incomplete ones are dropped."""
    return merge_batches(result, RECEIPTS_SCHEMA, ReceiptBatch, "receipts", run_id, window, _check_receipt_batch)


async def fetch_receipts(store: RecordStore, run_id: str, window: int) -> dict[PeerID, ReceiptBatch]:
    """All callers' batches for a window, by publisher."""
    return parse_receipt_batches(await store.get(receipts_key(run_id, window), latest=True), run_id, window)
