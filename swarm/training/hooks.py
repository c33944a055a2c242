"""`NodeHooks`: the one interface through which a node's behaviour can be altered on purpose (tests and demos).

The product calls these hooks at three points and never asks why a node behaves differently:

* the stage server passes what it is about to return through `NodeHooks.stage_outputs`;
* the trainer passes the gradients it is about to average through `NodeHooks.gradients_to_average`;
* the verification loop publishes `NodeHooks.extra_receipts` besides the receipts it collected.

`HONEST` (the default everywhere) returns every input unchanged. `swarm.testing.misbehave.Misbehaviour`
implements the deliberate cheats of ``--misbehave``; the node (a layer above) builds it and injects it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from swarm.p2p.identity import Identity
from swarm.verification.receipts import WorkReceipt


class NodeHooks(Protocol):
    """What a node returns, averages and publishes, as seen by the product code."""

    @property
    def label(self) -> str | None:
        """A name for how this node deviates, reported in its summary (None: it does not)."""
        ...

    @property
    def rebalances(self) -> bool:
        """Whether this node may move to another stage (False: it stays on the stage it joined)."""
        ...

    def stage_outputs(self, kind: str, result: torch.Tensor) -> torch.Tensor:
        """What a stage server returns for ``kind`` (``forward`` or ``backward``) instead of ``result``."""
        ...

    def gradients_to_average(self, step: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What this node sends to the all-reduce at ``step`` instead of ``grads``."""
        ...

    def extra_receipts(self, identity: Identity, *, run_id: str, step: int, stage: int) -> list[WorkReceipt]:
        """Receipts to publish besides the collected ones, asked every verification tick at ``step``."""
        ...


class HonestHooks:
    """The default: every hook returns its input unchanged and adds nothing."""

    @property
    def label(self) -> str | None:
        return None

    @property
    def rebalances(self) -> bool:
        return True

    def stage_outputs(self, kind: str, result: torch.Tensor) -> torch.Tensor:
        return result

    def gradients_to_average(self, step: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return grads

    def extra_receipts(self, identity: Identity, *, run_id: str, step: int, stage: int) -> list[WorkReceipt]:
        return []


HONEST: NodeHooks = HonestHooks()
