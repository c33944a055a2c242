"""A training node's verification duties: ack and retain served work, sign and publish receipts, and stand as
an orchestrator candidate (``--orchestrator-candidate``).

`swarm.training.trainer.build_training_role` builds one `NodeVerification` with the node's `NodeHooks` and hands
``witness`` and ``hooks`` to the role's `StageService` and ``collector`` to its `RemoteStageClient`; the role runs
`NodeVerification.run` in its TaskGroup and its `Stepper` passes the step's gradients through
``hooks.gradients_to_average`` before averaging. Peers whose step claims the run's records do not back
(`swarm.training.claims`) are reported through the same signed outlier reports (`report_step_claim`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from swarm.configs import Config, setting
from swarm.errors import SwarmError
from swarm.p2p.identity import Identity, PeerID
from swarm.training.hooks import HONEST, NodeHooks
from swarm.verification.common import RecordStore
from swarm.training.summary import VerificationSummary
from swarm.verification.gradient_checks import GradientCheckConfig, GradientChecker, InspectedValues
from swarm.verification.election import ElectionRole
from swarm.verification.orchestrator import Orchestrator, OrchestratorConfig
from swarm.verification.outliers import OutlierEntry
from swarm.verification.settings import VerificationSettings
from swarm.verification.witness import ReceiptCollector, ServerWitness, WitnessConfig

log = logging.getLogger(__name__)

MAX_STEP_LIARS = 1024  # peers whose step claims failed the rule, remembered by this node


class NodeVerificationConfig(Config, section="node_verification"):
    """Per-node verification options (the run-wide ones are `VerificationSettings` in the run config)."""

    orchestrator_candidate: bool = setting(default=False, doc="Stand for election as the rewards orchestrator.")
    ledger_path: Path | None = setting(default=None, doc="File of the reward ledger (candidates only).")
    tick_s: float = setting(default=0.5, gt=0, le=3600, doc="Seconds between rounds of the verification loop.")
    dht_timeout_s: float = setting(default=5.0, gt=0, le=3600, doc="Deadline of one DHT call.")


def orchestrator_config(
    settings: VerificationSettings,
    *,
    run_id: str,
    role: ElectionRole,
    ledger_path: Path | None,
    tick_s: float,
    dht_timeout_s: float,
) -> OrchestratorConfig:
    """The `OrchestratorConfig` of a candidate from the run's verification settings."""
    return OrchestratorConfig(
        run_id=run_id,
        role=role,
        election=settings.election(),
        rewards=settings.rewards(),
        settle_steps=settings.settle_steps,
        tick_s=tick_s,
        dht_timeout_s=dht_timeout_s,
        ledger_path=str(ledger_path) if ledger_path else None,
    )


class NodeVerification:
    """Owns the witness, the receipt collector, the node's hooks and the optional orchestrator."""

    def __init__(
        self,
        settings: VerificationSettings,
        cfg: NodeVerificationConfig,
        *,
        run_id: str,
        identity: Identity,
        dht: RecordStore,
        hooks: NodeHooks = HONEST,
    ) -> None:
        self.settings = settings
        self.cfg = cfg
        self.identity = identity
        self.hooks = hooks
        self.witness: ServerWitness | None = None
        self.collector: ReceiptCollector | None = None
        self.orchestrator: Orchestrator | None = None
        self.gradients: GradientChecker | None = None
        if settings.enabled:
            wcfg = WitnessConfig(
                run_id=run_id,
                window_steps=settings.window_steps,
                retention=settings.retention(),
                publish_timeout_s=cfg.dht_timeout_s,
            )
            self.witness = ServerWitness(identity, wcfg)
            self.collector = ReceiptCollector(identity, wcfg, dht)
            if settings.outlier_min_reporters > 0:
                self.gradients = GradientChecker(
                    identity,
                    GradientCheckConfig(
                        run_id=run_id,
                        window_steps=settings.window_steps,
                        outliers=settings.outliers(),
                        min_reporters=settings.outlier_min_reporters,
                    ),
                    dht,
                )
            if cfg.orchestrator_candidate:
                self.orchestrator = Orchestrator(
                    identity,
                    orchestrator_config(
                        settings,
                        run_id=run_id,
                        role=ElectionRole.CANDIDATE,
                        ledger_path=cfg.ledger_path,
                        tick_s=cfg.tick_s,
                        dht_timeout_s=cfg.dht_timeout_s,
                    ),
                    dht,
                    current_step=lambda: self._step_now(),
                )
        self.run_id = run_id
        self._step_now: Callable[[], int] = lambda: 0
        self._step_liars: dict[PeerID, int] = {}  # peers whose step claims failed the claim rule -> their claim
        self._liars: frozenset[PeerID] = frozenset()

    async def run(self, current_step: Callable[[], int], current_stage: Callable[[], int | None]) -> None:
        """Forever: publish closed windows' receipts (plus the hooks' extra ones), run the orchestrator."""
        self._step_now = current_step
        if self.collector is None:
            return
        while True:
            step = current_step()
            try:
                self._add_extra_receipts(step, current_stage())
                await self.collector.flush(step, now=time.time())
                if self.gradients is not None:
                    async with asyncio.timeout(self.cfg.dht_timeout_s):
                        await self.gradients.flush()
                        await self.gradients.refresh_reported(step // self.settings.window_steps)
                if self.orchestrator is not None:
                    await self.orchestrator.tick()
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning("%s: verification round failed, retrying: %s", self.identity.peer_id.short(), e)
            await asyncio.sleep(self.cfg.tick_s)

    @property
    def inspect_parts(self) -> int:
        """How many parts of each span the all-reduce keeps per sender for gradient checks (0: none)."""
        return 1 if self.gradients is not None else 0

    def offenders(self) -> frozenset[PeerID]:
        """Peers this node caught: by its gradient checks, or claiming steps the records do not back (left out of
        its all-reduce spans, its state downloads and its step evidence)."""
        caught = self.gradients.offenders() if self.gradients is not None else frozenset()
        return caught | self._liars if self._liars else caught

    def report_step_claim(self, peer: PeerID, *, claimed: int, believed: int, step: int, stage: int | None) -> None:
        """``peer`` claims step ``claimed`` where the claim rule believes ``believed``: report it through the
        gradient checks' signed outlier reports (reason ``step_claim``; the orchestrator flags a peer that
        ``outlier_min_reporters`` peers report), and treat it as an offender here from now on."""
        if peer in self._step_liars:
            return
        log.warning(
            "%s: %s claims step %d, the run's records back step %d; not believing it, reporting it",
            self.identity.peer_id.short(),
            peer.short(),
            claimed,
            believed,
        )
        self._step_liars[peer] = claimed
        while len(self._step_liars) > MAX_STEP_LIARS:
            self._step_liars.pop(next(iter(self._step_liars)))
        self._liars = frozenset(self._step_liars)
        if self.gradients is not None:
            entry = OutlierEntry(
                peer=peer.to_bytes(),
                step=claimed,
                reason="step_claim",
                distance=float(claimed - believed),
                median_distance=float(believed),
            )
            self.gradients.report(step, stage or 0, [entry])

    def confirmed_offenders(self) -> frozenset[PeerID]:
        """Offenders a quorum of peers reported: avoided in matchmaking too (one node's own finding alone is
        not, so that its stage peers still group with the offender and can confirm it)."""
        return self.gradients.confirmed() if self.gradients is not None else frozenset()

    async def inspect(self, step: int, stage: int, parts: Sequence[InspectedValues]) -> None:
        """Check the all-reduce parts this node reduced at ``step`` for outlier and replayed gradients."""
        if self.gradients is not None and parts:
            await asyncio.to_thread(self.gradients.inspect, step, stage, parts)

    def _add_extra_receipts(self, step: int, stage: int | None) -> None:
        if self.collector is None:
            return
        for receipt in self.hooks.extra_receipts(self.identity, run_id=self.run_id, step=step, stage=stage or 0):
            self.collector.add(receipt)

    def summary(self) -> VerificationSummary:
        """What the launcher reads: how this node deviated on purpose (its hooks' label) and what it attested."""
        return VerificationSummary(
            misbehave=self.hooks.label,
            orchestrator_candidate=self.orchestrator is not None,
            attested_windows=[a.window for a in self.orchestrator.signed] if self.orchestrator else [],
            ledger_path=str(self.cfg.ledger_path) if self.cfg.ledger_path else None,
        )


def ledger_path_for(data_dir: Path, run_id: str) -> Path:
    """Where a node keeps its orchestrator ledger: ``<data_dir>/ledger/<run_id>.jsonl``."""
    return data_dir / "ledger" / f"{run_id}.jsonl"


def node_verification_config(*, orchestrator_candidate: bool, data_dir: Path, run_id: str) -> NodeVerificationConfig:
    """The per-node verification options from ``--orchestrator-candidate``."""
    return NodeVerificationConfig(
        orchestrator_candidate=orchestrator_candidate,
        ledger_path=ledger_path_for(data_dir, run_id) if orchestrator_candidate else None,
    )


def rewards_summary(ledger_paths: list[Path], run_id: str) -> dict[str, Any]:
    """From orchestrators' ledgers: the accepted attestation per window (`pick_attestation`), each peer's mean
    share over those windows, every flagged peer, and the number of windows attested."""
    from swarm.verification.attestation import pick_attestation
    from swarm.verification.ledger import Ledger

    by_window: dict[int, list[Any]] = {}
    for path in ledger_paths:
        if path.exists():
            for att in Ledger(path).read():
                by_window.setdefault(att.window, []).append(att)
    accepted = [a for w in sorted(by_window) if (a := pick_attestation(by_window[w], run_id, w)) is not None]
    rewards: dict[str, float] = {}
    flagged: set[str] = set()
    for att in accepted:
        for peer, share in att.share_map().items():
            rewards[peer.to_base58()] = rewards.get(peer.to_base58(), 0.0) + share / len(accepted)
        flagged.update(PeerID(p).to_base58() for p in att.flagged)
    return {
        "rewards": {p: round(s, 6) for p, s in sorted(rewards.items())},
        "flagged": sorted(flagged),
        "attestations": len(accepted),
        "attested_windows": [a.window for a in accepted],
    }
