"""Deliberate misbehaviour for tests and demos (``--misbehave KIND``): the hooks a cheating node runs.

Kinds:

* ``noisy-forward``: perturbs forward outputs with Gaussian noise of ``noise_scale`` x their std;
* ``lazy``: returns zeros instead of computed outputs (forward and backward);
* ``sign-flip``: sends its gradients x(-1000) to the all-reduce;
* ``forge-receipts``: as a caller, also signs receipts for itself (and for a colluder) for work never done;
* ``replay``: re-sends the gradients of an old step to the all-reduce.

`Misbehaviour` implements `swarm.training.hooks.NodeHooks`, the one interface the product calls: the stage
server passes what it returns through `stage_outputs`, the trainer passes what it averages through
`gradients_to_average`, and the verification loop publishes `extra_receipts` (forged ones, once per step).
With ``kind=None`` every hook returns its input unchanged. The node builds it (`hooks_for`) from its config.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from swarm.configs import Config, setting
from swarm.errors import ConfigError
from swarm.p2p.identity import Identity, PeerID
from swarm.training.hooks import HONEST, NodeHooks
from swarm.verification.common import digest_parts
from swarm.verification.receipts import WorkClaim, WorkReceipt, forge_receipt

log = logging.getLogger(__name__)

KINDS = ("noisy-forward", "lazy", "sign-flip", "forge-receipts", "replay")
SIGN_FLIP_FACTOR = -1000.0


class MisbehaveConfig(Config, section="misbehave"):
    """Which cheat this node runs (None: honest) and its knobs."""

    kind: str | None = setting(default=None, choices=KINDS, doc="The cheat (see the module doc); None: honest.")
    noise_scale: float = setting(
        default=0.5, gt=0, le=100, doc="noisy-forward: noise std as a multiple of the outputs'."
    )
    forged_per_flush: int = setting(default=8, ge=1, le=10_000, doc="forge-receipts: receipts forged per flush.")
    seed: int = setting(default=0, doc="Seed of the noise.")


def parse_misbehave_spec(text: str) -> tuple[str, int]:
    """``KIND:COUNT`` (as in ``swarm-node local --misbehave lazy:1``) -> (kind, count); ConfigError if malformed."""
    kind, sep, count = text.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"--misbehave: kind must be one of {KINDS}, got {kind!r}")
    if not sep:
        return kind, 1
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--misbehave: COUNT must be a positive integer, got {count!r} in {text!r}")
    return kind, int(count)


def misbehave_args(num_nodes: int, specs: tuple[tuple[str, int], ...]) -> dict[int, tuple[str, ...]]:
    """Which training nodes of a local swarm cheat: the last ones (never node 0, the bootstrap peer, unless
    every node cheats), as ``{index: ("--misbehave", KIND)}``."""
    args: dict[int, tuple[str, ...]] = {}
    index = num_nodes - 1
    for kind, count in specs:
        for _ in range(count):
            args[index] = ("--misbehave", kind)
            index -= 1
    return args


def hooks_for(cfg: MisbehaveConfig | None) -> NodeHooks:
    """The hooks a node injects into its training role: `HONEST` unless ``cfg`` names a cheat."""
    return HONEST if cfg is None or cfg.kind is None else Misbehaviour(cfg)


class Misbehaviour:
    """The cheating hooks of one node (a `swarm.training.hooks.NodeHooks`)."""

    def __init__(self, cfg: MisbehaveConfig) -> None:
        self.cfg = cfg
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._first_gradients: list[torch.Tensor] | None = None
        self._forged = 0
        self._forged_steps: set[int] = set()

    @property
    def kind(self) -> str | None:
        return self.cfg.kind

    @property
    def label(self) -> str | None:
        """The cheat's name, reported as ``misbehave`` in the node's summary."""
        return self.cfg.kind

    @property
    def rebalances(self) -> bool:
        """A cheating node stays on the stage it joined: the demos measure detection, not a chase."""
        return self.cfg.kind is None

    def stage_outputs(self, kind: str, result: torch.Tensor) -> torch.Tensor:
        return self.outputs(kind, result)

    def gradients_to_average(self, step: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.gradients(step, grads)

    def extra_receipts(self, identity: Identity, *, run_id: str, step: int, stage: int) -> list[WorkReceipt]:
        """With ``forge-receipts``: forged receipts, once per step; else none."""
        if self.cfg.kind != "forge-receipts" or step in self._forged_steps:
            return []
        self._forged_steps.add(step)
        return self.forged_receipts(identity, run_id=run_id, step=step, stage=stage)

    def outputs(self, kind: str, result: torch.Tensor) -> torch.Tensor:
        """What a stage server returns for ``kind`` (forward/backward) instead of ``result``."""
        if self.cfg.kind == "lazy" and result.is_floating_point():
            return torch.zeros_like(result)
        if self.cfg.kind == "noisy-forward" and kind == "forward" and result.is_floating_point():
            noise = torch.randn(result.shape, generator=self._generator).to(result.dtype)
            return result + self.cfg.noise_scale * result.detach().float().std().to(result.dtype) * noise
        return result

    def gradients(self, step: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What this node sends to the all-reduce at ``step`` instead of ``grads``."""
        if self.cfg.kind == "sign-flip":
            return [g * SIGN_FLIP_FACTOR for g in grads]
        if self.cfg.kind == "replay":
            shapes = [g.shape for g in grads]
            if self._first_gradients is None or [g.shape for g in self._first_gradients] != shapes:
                if any(bool(g.any()) for g in grads):  # the first step (of this stage) with work to replay
                    self._first_gradients = [g.detach().clone() for g in grads]
                return grads
            return [g.clone() for g in self._first_gradients]
        return grads

    def forged_receipts(
        self, identity: Identity, *, run_id: str, step: int, stage: int, colluder: PeerID | None = None
    ) -> list[WorkReceipt]:
        """Receipts for work never done: for this node itself, or for ``colluder`` with an ack this node made up."""
        if self.cfg.kind != "forge-receipts":
            return []
        receipts = []
        for _ in range(self.cfg.forged_per_flush):
            self._forged += 1
            mb = f"forged-{identity.peer_id.short()}-{self._forged}"
            server = colluder or identity.peer_id
            fake = digest_parts([hashlib.sha256(mb.encode()).digest()])
            claim = WorkClaim(
                run_id=run_id,
                step=step,
                stage=stage,
                server=server.to_bytes(),
                caller=identity.peer_id.to_bytes(),
                microbatch_id=mb,
                kind="forward",
                input_hash=fake,
                output_hash=fake,
                num_samples=16,
            )
            receipts.append(forge_receipt(identity, claim, identity.sign(claim.ack_body())))
        log.warning("%s: misbehaving: forged %d receipts at step %d", identity.peer_id.short(), len(receipts), step)
        return receipts
