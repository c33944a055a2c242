"""`NodeSource`: what the HTTP endpoints read of a running node, whatever its role.

The node hands its transport and two getters (its DHT and its role, None until they exist); the functions here
answer the same questions of a `TrainingRole`, a `ValidatorRole` or no role (a DHT-only node, or one still
joining), so the metrics, the health check and the status page never branch on the role themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarm.averaging.stats import AveragingStats
from swarm.p2p import Transport
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig
from swarm.training.node_role import Role
from swarm.training.trainer import TrainingRole
from swarm.training.validator import ValidatorRole
from swarm.training.view import SwarmView

AnyRole = TrainingRole | ValidatorRole


@dataclass(frozen=True, kw_only=True)
class NodeSource:
    """The live parts of one node: read at every request, never copied."""

    transport: Transport
    dht: Callable[[], Any]  # the node's `swarm.dht.DHT` once joined, else None
    role: Callable[[], AnyRole | None]  # the node's role once built, else None
    expects_role: bool = True  # False for a DHT-only node (``--role dht``)

    @property
    def me(self) -> PeerID:
        return self.transport.peer_id


def run_config(role: AnyRole | None) -> RunConfig | None:
    if isinstance(role, TrainingRole):
        return role.state.run_cfg
    return role.cfg.run if role is not None else None


def role_name(role: AnyRole | None, source: NodeSource) -> str:
    if isinstance(role, TrainingRole):
        return str(role.state.cfg.role.value)
    if isinstance(role, ValidatorRole):
        return "validator"
    return "starting" if source.expects_role else "dht"


def node_step(role: AnyRole | None) -> int | None:
    """The node's step: its stage's (a trainer or validator: the swarm's as it believes it); None without a role."""
    if isinstance(role, TrainingRole):
        return role.state.current_step()
    return role.current_step() if role is not None else None


def max_steps(role: AnyRole | None) -> int | None:
    if isinstance(role, TrainingRole):
        return role.state.cfg.max_steps
    return role.cfg.max_steps if role is not None else None


def served_stage(role: AnyRole | None) -> int | None:
    return role.state.stage() if isinstance(role, TrainingRole) else None


def serves(role: AnyRole | None) -> bool:
    """Whether the role does its job now: a stage served (a ``trainer`` drives without one), or validating."""
    if isinstance(role, TrainingRole):
        return role.state.server is not None or role.state.cfg.role == Role.TRAINER
    return role is not None


def role_view(role: AnyRole | None) -> SwarmView | None:
    """The view of the run the role acts on (what it read last from the DHT)."""
    if isinstance(role, TrainingRole):
        return role.state.view
    return role.view if role is not None else None


def averaging_stats(role: AnyRole | None) -> AveragingStats | None:
    return role.stepper.averager.stats if isinstance(role, TrainingRole) else None


def own_losses(role: AnyRole | None) -> tuple[dict[int, float], dict[int, float]]:
    """This node's training loss per step (the mean of its microbatches) and its validation losses per step."""
    if not isinstance(role, TrainingRole):
        return {}, {}
    st = role.state
    train = {step: sum(v) / len(v) for step, v in list(st.losses.items()) if v}
    return train, dict(st.eval_losses)


def latest_own_loss(role: AnyRole | None) -> float | None:
    if not isinstance(role, TrainingRole) or not role.state.losses:
        return None
    last = role.state.losses[max(role.state.losses)]
    return last[-1] if last else None


def samples_counts(role: AnyRole | None) -> tuple[int, int]:
    """Samples this node drove through the pipeline, and samples its stage served."""
    if not isinstance(role, TrainingRole):
        return 0, 0
    st = role.state
    return st.samples_driven, st.server.total_samples if st.server is not None else 0


def offenders(role: AnyRole | None) -> frozenset[PeerID]:
    """Peers this node itself caught cheating (its gradient checks, or step claims the records do not back)."""
    return role.checks.offenders() if isinstance(role, TrainingRole) else frozenset()
