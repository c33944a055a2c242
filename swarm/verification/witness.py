"""The two ends of a served microbatch: the server's witness (retain + ack) and the caller's receipt collector.

Both work on the exact wire payloads (the encoded tensors as sent), so the hashes agree without re-encoding:

* server, after encoding its reply: ``ack = witness.witness(caller=..., inputs=[...], outputs=[...], ...)``
  retains the payloads for validators and returns the ack to put in the reply;
* caller, after getting the reply: ``collector.record(server=..., inputs=[...], outputs=[...], ack=...)`` checks
  the ack and signs a receipt; ``await collector.flush(current_step)`` publishes each closed window's batch
  under ``{run}/receipts/{window}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from swarm.p2p.identity import Identity, PeerID
from swarm.configs import Config, setting
from swarm.errors import ProtocolError, VerificationError
from swarm.p2p.messages import Message
from swarm.verification.common import RecordStore, check_digest, digest_parts
from swarm.verification.receipts import ReceiptBatch, WorkClaim, WorkReceipt, publish_receipts, sign_ack, sign_receipt
from swarm.verification.retention import FetchService, RetentionConfig, RetentionStore

log = logging.getLogger(__name__)

KEEP_WINDOWS = 4  # closed windows whose receipts stay in memory, so a late receipt re-publishes the whole batch


class WitnessConfig(Config, section="witness"):
    """Receipt bookkeeping of one node (``window_steps`` from the run config)."""

    run_id: str = setting(doc="The run whose receipts are kept.")
    window_steps: int = setting(default=10, ge=1, le=1_000_000, doc="Steps per reward window.")
    retention: RetentionConfig = setting(default_factory=RetentionConfig, doc="What served work is kept.")
    receipts_ttl_s: float = setting(default=24 * 3600.0, gt=0, le=365 * 86400, doc="Lifetime of published receipts.")
    publish_timeout_s: float = setting(default=10.0, gt=0, le=600, doc="Deadline of one publication of receipts.")

    def validate(self) -> None:
        if not self.run_id:
            raise self.invalid("run_id", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class UpstreamWork(Message):
    """Work a driver did on its own stage (its ``stage``-``s`` forward of a microbatch), sent along with the
    request to stage ``s + 1``: that server, whose inputs are this work's outputs, signs the receipt for it."""

    stage: int
    microbatch_id: str
    input_hash: bytes
    num_samples: int
    ack: bytes
    weights: bytes = b""  # the digest of the driver's weights that computed it (b"": not named)

    def __post_init__(self) -> None:
        if self.weights:
            check_digest(self.weights, "weights")
        if self.stage < 0 or not 1 <= self.num_samples <= 1 << 20 or not 0 < len(self.microbatch_id) <= 128:
            raise ValueError("stage must be >= 0, num_samples in [1, 2**20], microbatch_id 1..128 chars")
        check_digest(self.input_hash, "input_hash")


def make_claim(
    *,
    run_id: str,
    server: PeerID,
    caller: PeerID,
    step: int,
    stage: int,
    microbatch_id: str,
    kind: str,
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    num_samples: int,
    weights: bytes = b"",
) -> WorkClaim:
    """The claim both ends build from the same payloads (ProtocolError if a field is out of range); ``weights``:
    the digest of the server's weights that computed it."""
    try:
        return WorkClaim(
            run_id=run_id,
            step=step,
            stage=stage,
            server=server.to_bytes(),
            caller=caller.to_bytes(),
            microbatch_id=microbatch_id,
            kind=kind,
            input_hash=digest_parts(inputs),
            output_hash=digest_parts(outputs),
            num_samples=num_samples,
            weights=weights,
        )
    except ValueError as e:
        raise ProtocolError(f"work claim: {e}") from None


class ServerWitness:
    """Stage server side: retains what it served (for ``verify.fetch``) and acknowledges it."""

    def __init__(self, identity: Identity, cfg: WitnessConfig) -> None:
        self.identity = identity
        self.cfg = cfg
        self.retention = RetentionStore(cfg.retention)
        self.service = FetchService(cfg.run_id, self.retention)

    def witness(
        self,
        *,
        caller: PeerID,
        step: int,
        stage: int,
        microbatch_id: str,
        kind: str,
        inputs: Sequence[bytes],
        outputs: Sequence[bytes],
        num_samples: int,
        weights: bytes = b"",
    ) -> bytes:
        """Retain the payloads and return this server's ack signature for the caller's receipt (``weights``: the
        digest of the weights that computed them, named in both)."""
        claim = make_claim(
            run_id=self.cfg.run_id,
            server=self.identity.peer_id,
            caller=caller,
            step=step,
            stage=stage,
            microbatch_id=microbatch_id,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            num_samples=num_samples,
            weights=weights,
        )
        self.retention.put(
            step=step,
            stage=stage,
            microbatch_id=microbatch_id,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            weights=weights,
        )
        return sign_ack(self.identity, claim)

    def upstream(
        self,
        *,
        next_server: PeerID,
        step: int,
        stage: int,
        microbatch_id: str,
        inputs: Sequence[bytes],
        outputs: Sequence[bytes],
        num_samples: int,
        weights: bytes = b"",
    ) -> bytes:
        """Witness this node's own forward of ``stage`` whose ``outputs`` go to ``next_server`` (the receipt's
        signer); returns the packed `UpstreamWork` to attach to that request."""
        ack = self.witness(
            caller=next_server,
            step=step,
            stage=stage,
            microbatch_id=microbatch_id,
            kind="forward",
            inputs=inputs,
            outputs=outputs,
            num_samples=num_samples,
            weights=weights,
        )
        return UpstreamWork(
            stage=stage,
            microbatch_id=microbatch_id,
            input_hash=digest_parts(inputs),
            num_samples=num_samples,
            ack=ack,
            weights=weights,
        ).pack()


class ReceiptCollector:
    """Caller side: signs a receipt per acknowledged result and publishes them per window."""

    def __init__(self, identity: Identity, cfg: WitnessConfig, store: RecordStore) -> None:
        self.identity = identity
        self.cfg = cfg
        self.store = store
        self._pending: dict[int, list[WorkReceipt]] = {}
        self._dirty: set[int] = set()
        self.published_windows: list[int] = []

    def record(
        self,
        *,
        server: PeerID,
        step: int,
        stage: int,
        microbatch_id: str,
        kind: str,
        inputs: Sequence[bytes],
        outputs: Sequence[bytes],
        num_samples: int,
        ack: bytes,
        weights: bytes = b"",
    ) -> WorkReceipt | None:
        """Sign a receipt for a result whose ack verifies (``weights``: the digest the server's reply named); None
        (and a warning) if it does not."""
        try:
            claim = make_claim(
                run_id=self.cfg.run_id,
                server=server,
                caller=self.identity.peer_id,
                step=step,
                stage=stage,
                microbatch_id=microbatch_id,
                kind=kind,
                inputs=inputs,
                outputs=outputs,
                num_samples=num_samples,
                weights=weights,
            )
            receipt = sign_receipt(self.identity, claim, ack)
        except (ProtocolError, VerificationError) as e:
            log.warning(
                "%s: no receipt for %s from %s: %s", self.identity.peer_id.short(), microbatch_id, server.short(), e
            )
            return None
        self.add(receipt)
        return receipt

    def record_upstream(
        self, *, server: PeerID, step: int, upstream: bytes, received: Sequence[bytes]
    ) -> WorkReceipt | None:
        """Sign a receipt for ``server``'s own upstream forward whose outputs this node ``received`` as inputs;
        None (and a warning) if the attached `UpstreamWork` is malformed or its ack does not verify."""
        try:
            up = UpstreamWork.unpack(upstream)
            claim = WorkClaim(
                run_id=self.cfg.run_id,
                step=step,
                stage=up.stage,
                server=server.to_bytes(),
                caller=self.identity.peer_id.to_bytes(),
                microbatch_id=up.microbatch_id,
                kind="forward",
                input_hash=up.input_hash,
                output_hash=digest_parts(received),
                num_samples=up.num_samples,
                weights=up.weights,
            )
            receipt = sign_receipt(self.identity, claim, up.ack)
        except (ProtocolError, ValueError, VerificationError) as e:
            log.warning(
                "%s: no receipt for the upstream work of %s: %s", self.identity.peer_id.short(), server.short(), e
            )
            return None
        self.add(receipt)
        return receipt

    def pending(self) -> list[WorkReceipt]:
        """Every receipt still held (published or not), oldest window first."""
        return [r for window in sorted(self._pending) for r in self._pending[window]]

    def add(self, receipt: WorkReceipt) -> None:
        """Queue an already signed receipt for its window's batch."""
        window = receipt.claim.step // self.cfg.window_steps
        self._pending.setdefault(window, []).append(receipt)
        self._dirty.add(window)

    async def flush(self, current_step: int, *, now: float, final: bool = False) -> int:
        """Publish the batch of every window that closed before ``current_step`` (all, if ``final``).

        A window's batch holds every receipt of that window so far: a late receipt re-publishes it whole.
        Returns the number of receipts in the batches published."""
        current_window = current_step // self.cfg.window_steps
        published = 0
        for window in sorted(self._dirty):
            if window >= current_window and not final:
                continue
            receipts = self._pending[window]
            batch = ReceiptBatch(
                run_id=self.cfg.run_id,
                window=window,
                publisher=self.identity.peer_id.to_bytes(),
                receipts=list(receipts),
            )
            async with asyncio.timeout(self.cfg.publish_timeout_s):
                await publish_receipts(self.store, batch, now + self.cfg.receipts_ttl_s)
            self._dirty.discard(window)
            self.published_windows.append(window)
            published += len(receipts)
            log.info("%s: published %d receipts for window %d", self.identity.peer_id.short(), len(receipts), window)
        for window in [w for w in self._pending if w < current_window - KEEP_WINDOWS and w not in self._dirty]:
            del self._pending[window]
        return published
