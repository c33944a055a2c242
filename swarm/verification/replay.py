"""Replaying sampled work: the `Replayer` Protocol swarm implements, and the validator's check of a receipt.

A validator samples each valid receipt with probability ``sample_probability`` using its own secret
randomness, after the receipt is published, so a server cannot know which of its microbatches will be
checked and must keep (and have honestly computed) all of them. For a sampled receipt it fetches the
retained input and output from the server, checks both against the hashes the caller signed, recomputes
the stage with the weights of that step and compares within the run's tolerances.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from swarm.p2p.identity import Identity, PeerID
from swarm.configs import Config, setting
from swarm.errors import CodecError, SwarmError, VerificationError
from swarm.verification.common import digest_parts
from swarm.verification.compare import ToleranceConfig, compare_outputs
from swarm.verification.receipts import WorkReceipt
from swarm.verification.retention import FetchReply, FetchRequest
from swarm.verification.verdicts import Verdict, sign_verdict

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ReplayUnavailableError(VerificationError):
    """The validator cannot recompute this work (no weights for that stage and step); no verdict is issued."""

    code = "replay_unavailable"


class Replayer(Protocol):
    """Recomputes one stage's forward or backward at a given step (implemented by `swarm/validator.py`)."""

    def recompute(
        self,
        *,
        stage: int,
        step: int,
        kind: str,
        inputs: Sequence[bytes],
        server: PeerID | None = None,
        weights: bytes = b"",
    ) -> list[torch.Tensor]:
        """The outputs the stage should have produced for these wire inputs, with the weights ``server`` used at
        ``step`` (replicas can differ after a failed averaging round, and between the outer syncs of local_sgd
        mode): the weights whose digest is ``weights`` when the receipt names them and they are at hand. Raises
        ReplayUnavailableError if those weights are not available. (``weights`` is passed only when named.)"""
        ...

    def decode_outputs(self, *, stage: int, kind: str, outputs: Sequence[bytes]) -> list[torch.Tensor]:
        """The server's claimed outputs as tensors (CodecError if they do not decode)."""
        ...


class Fetcher(Protocol):
    """Gets a server's retained payloads (`swarm.verification.retention.call_fetch` over a transport)."""

    async def fetch(self, server: PeerID, req: FetchRequest) -> FetchReply: ...


class CheckConfig(Config, section="check"):
    """How a validator checks work (sample probability and tolerances come from the run config)."""

    sample_probability: float = setting(default=0.1, ge=0.0, le=1.0, doc="Share of receipts replayed.")
    tolerance: ToleranceConfig = setting(default_factory=ToleranceConfig, doc="How close a replay must come.")
    fetch_timeout_s: float = setting(default=10.0, gt=0, le=600, doc="Deadline of one fetch of retained work.")
    fetch_attempts: int = setting(default=3, ge=1, le=10, doc="Fetches of one piece of work before giving up.")
    max_checks_per_window: int = setting(default=256, ge=1, le=1_000_000, doc="Most replays per reward window.")


class ReceiptChecker:
    """Samples receipts and turns each sampled one into a signed verdict."""

    def __init__(
        self,
        identity: Identity,
        cfg: CheckConfig,
        replayer: Replayer,
        fetcher: Fetcher,
        rng: random.Random | None = None,
        present: Callable[[PeerID], Awaitable[bool]] | None = None,
    ) -> None:
        self.identity = identity
        self.cfg = cfg
        self.replayer = replayer
        self.fetcher = fetcher
        self._rng = rng if rng is not None else random.SystemRandom()
        # whether a server is still up (e.g. answers a ping): an unreachable server that is gone gets no verdict,
        # one that is up but does not answer verify.fetch fails (None: every unreachable server fails)
        self.present = present

    def sample(self, receipts: Sequence[WorkReceipt], min_step: int = 0) -> list[WorkReceipt]:
        """Each valid receipt of step >= ``min_step`` independently with probability p (at most
        max_checks_per_window). Older receipts may have left the servers' retention window: not demanded."""
        chosen = [
            r
            for r in receipts
            if r.claim.step >= min_step and r.problem() is None and self._rng.random() < self.cfg.sample_probability
        ]
        return chosen[: self.cfg.max_checks_per_window]

    async def check_window(self, receipts: Sequence[WorkReceipt], window: int, min_step: int = 0) -> list[Verdict]:
        """Sample and check a window's receipts (of step >= ``min_step``); verdicts for the conclusive checks."""
        verdicts = []
        for receipt in self.sample(receipts, min_step):
            verdict = await self.check(receipt, window)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    async def check(self, receipt: WorkReceipt, window: int) -> Verdict | None:
        """Fetch, hash-check, replay and compare one receipt; None if the check was inconclusive."""
        claim = receipt.claim
        req = FetchRequest(
            run_id=claim.run_id, step=claim.step, stage=claim.stage, microbatch_id=claim.microbatch_id, kind=claim.kind
        )
        reply = await self._fetch(claim.server_id, req)
        if reply is None:
            if self.present is not None and not await self.present(claim.server_id):
                log.info(
                    "validator %s: %s left the swarm; its receipt %s is not checked",
                    self.identity.peer_id.short(),
                    claim.server_id.short(),
                    claim.microbatch_id,
                )
                return None
            return self._verdict(receipt, window, False, "server unreachable for verify.fetch")
        try:
            passed, reason = await self._judge(receipt, reply)
        except ReplayUnavailableError as e:
            log.info(
                "validator %s: cannot replay %s of %s: %s",
                self.identity.peer_id.short(),
                claim.microbatch_id,
                claim.server_id.short(),
                e,
            )
            return None
        return self._verdict(receipt, window, passed, reason)

    async def _judge(self, receipt: WorkReceipt, reply: FetchReply) -> tuple[bool, str]:
        claim = receipt.claim
        if not reply.found:
            return False, "server has no retained data for this receipt"
        if digest_parts(reply.inputs) != claim.input_hash:
            return False, "retained input does not match the receipt's input hash"
        if digest_parts(reply.outputs) != claim.output_hash:
            return False, "retained output does not match the receipt's output hash"
        try:
            claimed = await asyncio.to_thread(
                self.replayer.decode_outputs, stage=claim.stage, kind=claim.kind, outputs=reply.outputs
            )
        except CodecError as e:
            return False, f"retained output does not decode: {e}"
        try:
            expected = await asyncio.to_thread(
                self.replayer.recompute,
                stage=claim.stage,
                step=claim.step,
                kind=claim.kind,
                inputs=reply.inputs,
                server=claim.server_id,
                **({"weights": claim.weights} if claim.weights else {}),
            )
        except ReplayUnavailableError:
            raise
        except (CodecError, ValueError, RuntimeError) as e:
            raise ReplayUnavailableError(f"the caller's input cannot be replayed ({type(e).__name__}: {e})") from None
        result = compare_outputs(expected, claimed, self.cfg.tolerance)
        return result.passed, result.reason

    async def _fetch(self, server: PeerID, req: FetchRequest) -> FetchReply | None:
        for attempt in range(1, self.cfg.fetch_attempts + 1):
            try:
                async with asyncio.timeout(self.cfg.fetch_timeout_s):
                    return await self.fetcher.fetch(server, req)
            except (SwarmError, TimeoutError) as e:
                log.warning(
                    "validator %s: verify.fetch from %s failed (attempt %d/%d): %s",
                    self.identity.peer_id.short(),
                    server.short(),
                    attempt,
                    self.cfg.fetch_attempts,
                    e,
                )
        return None

    def _verdict(self, receipt: WorkReceipt, window: int, passed: bool, reason: str) -> Verdict:
        claim = receipt.claim
        level = logging.DEBUG if passed else logging.WARNING
        log.log(
            level,
            "validator %s: %s %s step %d stage %d %s: %s",
            self.identity.peer_id.short(),
            "PASS" if passed else "FAIL",
            claim.server_id.short(),
            claim.step,
            claim.stage,
            claim.kind,
            reason,
        )
        return sign_verdict(
            self.identity,
            run_id=claim.run_id,
            window=window,
            step=claim.step,
            subject=claim.server_id,
            receipt_id=receipt.receipt_id,
            passed=passed,
            reason=reason,
        )
