"""Signed verdicts: a validator's pass/fail on one receipt, published per window."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

from swarm.p2p.identity import SIGNATURE_SIZE_BYTES, Identity, PeerID
from swarm.p2p.messages import Message
from swarm.dht.keys import VERDICTS, verdicts_key
from swarm.verification.batches import batch_schema, merge_batches, publish_batch
from swarm.verification.common import RecordStore, check_digest, peer_from_bytes, signing_body

log = logging.getLogger(__name__)

_VERDICT_DOMAIN = b"swarm/verdict/v1\x00"
MAX_REASON_CHARS = 512


@dataclass(frozen=True, kw_only=True)
class Verdict(Message):
    """``validator`` checked ``receipt_id`` (crediting ``subject``) at ``step`` and found it passed or not."""

    run_id: str
    window: int
    step: int
    validator: bytes
    subject: bytes
    receipt_id: bytes
    passed: bool
    reason: str
    signature: bytes

    def __post_init__(self) -> None:
        if self.window < 0 or self.step < 0:
            raise ValueError("window and step must be >= 0")
        if len(self.reason) > MAX_REASON_CHARS:
            raise ValueError(f"reason must have at most {MAX_REASON_CHARS} characters")
        if len(self.signature) != SIGNATURE_SIZE_BYTES:
            raise ValueError(f"signature must have {SIGNATURE_SIZE_BYTES} bytes")
        check_digest(self.receipt_id, "receipt_id")
        peer_from_bytes(self.validator, "validator")
        peer_from_bytes(self.subject, "subject")

    def body(self) -> bytes:
        fields = self.to_wire()
        del fields["signature"]
        return signing_body(_VERDICT_DOMAIN, fields)

    @property
    def verdict_id(self) -> bytes:
        return hashlib.sha256(self.body()).digest()

    @property
    def validator_id(self) -> PeerID:
        return PeerID(self.validator)

    @property
    def subject_id(self) -> PeerID:
        return PeerID(self.subject)

    def is_valid(self) -> bool:
        """True if the validator's signature verifies."""
        return self.validator_id.verify(self.signature, self.body())


def sign_verdict(
    identity: Identity,
    *,
    run_id: str,
    window: int,
    step: int,
    subject: PeerID,
    receipt_id: bytes,
    passed: bool,
    reason: str,
) -> Verdict:
    """Make and sign a verdict as ``identity``."""
    unsigned = Verdict(
        run_id=run_id,
        window=window,
        step=step,
        validator=identity.peer_id.to_bytes(),
        subject=subject.to_bytes(),
        receipt_id=receipt_id,
        passed=passed,
        reason=reason[:MAX_REASON_CHARS],
        signature=bytes(SIGNATURE_SIZE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.body()))


@dataclass(frozen=True, kw_only=True)
class VerdictBatch(Message):
    """The verdicts one validator issued in one window, under ``{run}/verdicts/{window}``."""

    run_id: str
    window: int
    publisher: bytes
    verdicts: list[Verdict]
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


VERDICTS_SCHEMA = batch_schema(VERDICTS, VerdictBatch)


async def publish_verdicts(store: RecordStore, batch: VerdictBatch, expiration_time: float) -> bool:
    """Store a validator's batch (in parts that fit a record) under its owner subkeys."""
    return await publish_batch(store, verdicts_key(batch.run_id, batch.window), batch, "verdicts", expiration_time)


def _check_verdict_batch(batch: VerdictBatch) -> str | None:
    if any(
        v.validator != batch.publisher or v.window != batch.window or v.run_id != batch.run_id for v in batch.verdicts
    ):
        return "it holds verdicts for another validator or window"
    return None


def parse_verdict_batches(result: object, run_id: str, window: int) -> dict[PeerID, VerdictBatch]:
    """Whole batches by publisher from a DHT answer; malformed, mislabelled or incomplete ones are dropped."""
    return merge_batches(result, VERDICTS_SCHEMA, VerdictBatch, "verdicts", run_id, window, _check_verdict_batch)


async def fetch_verdicts(store: RecordStore, run_id: str, window: int) -> dict[PeerID, VerdictBatch]:
    """All validators' batches for a window, by publisher."""
    return parse_verdict_batches(await store.get(verdicts_key(run_id, window), latest=True), run_id, window)
