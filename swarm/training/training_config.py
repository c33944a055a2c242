"""`TrainingConfig`: the training role of one node (`swarm.training.trainer.TrainingRole`), validated up front."""

from __future__ import annotations

from pathlib import Path

from swarm.training.balancing import BalanceConfig
from swarm.run.config import RunConfig
from swarm.training.driver import DriverConfig
from swarm.configs import Config, setting
from swarm.errors import ConfigError
from swarm.model.devices import DEVICE_CHOICES
from swarm.training.messages import MAX_RECORD_PERIOD_S
from swarm.training.node_role import TRAINING_ROLES, Role
from swarm.training.verifying import NodeVerificationConfig
from swarm.training.wiring import WiringConfig


def _training_role(value: object) -> Role:
    return Role.parse(value, allowed=TRAINING_ROLES)


class TrainingConfig(Config, section="training"):
    """The training role of one node. Durations in seconds."""

    run: RunConfig = setting(doc="The run this node trains.")
    stage: int | None = setting(default=None, ge=0, doc="Stage to serve (None: choose the weakest).")
    role: Role = setting(
        default=Role.AUTO,
        convert=_training_role,
        choices=tuple(role.value for role in Role if role in TRAINING_ROLES),
        doc="auto (serve, and drive on stage 0), server (serve only) or trainer (drive only); a string is parsed.",
    )
    device: str = setting(
        default="cpu",
        choices=DEVICE_CHOICES,
        doc="Torch device of the stage: cpu, cuda, mps, or auto (CUDA, then MPS, then CPU; resolved at start).",
    )
    checkpoint_dir: Path | None = setting(default=None, doc="Where stage checkpoints go (None: none).")
    save_every_steps: int = setting(default=5, ge=1, le=10_000, doc="Steps between checkpoints.")
    max_steps: int | None = setting(default=None, ge=1, doc="Stop after this many optimizer steps (None: never).")
    summary_path: Path | None = setting(default=None, doc="Write the node's summary JSON here when it stops.")
    record_period_s: float = setting(
        default=5.0,
        gt=0,
        le=MAX_RECORD_PERIOD_S,
        doc="Seconds between republishes of own records (a peer record lives two; nodes refuse longer-lived ones).",
    )
    poll_interval_s: float = setting(
        default=0.2, gt=0, le=86400, doc="Seconds between polls while waiting on the swarm."
    )
    view_interval_s: float = setting(default=0.2, gt=0, le=86400, doc="Seconds between refreshes of the swarm view.")
    rpc_timeout_s: float = setting(default=10.0, gt=0, le=86400, doc="Deadline of one stage request.")
    dht_timeout_s: float = setting(default=5.0, gt=0, le=86400, doc="Deadline of one DHT call.")
    next_step_hold_s: float = setting(
        default=2.0,
        ge=0,
        le=86400,
        doc="How long a stage request for the step after the served one waits for it (0: refused as stale at once).",
    )
    inflight_microbatches: int = setting(
        default=4, ge=1, le=10_000, doc="Microbatches a driver has in flight (enough to hide a round trip per wave)."
    )
    matchmaking_time_s: float = setting(default=3.0, gt=0, le=86400, doc="How long averaging gathers peers.")
    allreduce_timeout_s: float = setting(default=30.0, gt=0, le=86400, doc="Deadline of one all-reduce.")
    behind_grace_s: float = setting(
        default=5.0, gt=0, le=86400, doc="A step open this long lets a driver feed more than its fair share."
    )
    rebalance_interval_s: float = setting(
        default=20.0, ge=0, le=86400, doc="Seconds between rebalancing checks (0 disables)."
    )
    start_after_peers: int = setting(
        default=0, ge=0, le=100_000, doc="Drive no microbatch until this many peers are in the run's records."
    )
    finish_linger_s: float = setting(
        default=60.0, ge=0, le=86400, doc="After max_steps, serve validators this long (0: leave at once)."
    )
    seed: int = setting(default=0, doc="Seed of this node's own randomness (peer choice, sampling).")
    wiring: WiringConfig = setting(default_factory=WiringConfig, doc="Choice of next-stage peers and bans.")
    driver: DriverConfig = setting(default_factory=DriverConfig, doc="Retries of microbatches.")
    balance: BalanceConfig = setting(default_factory=BalanceConfig, doc="Stage rebalancing.")
    verification: NodeVerificationConfig = setting(
        default_factory=NodeVerificationConfig, doc="This node's verification duties."
    )

    def validate(self) -> None:
        n = self.run.pipeline.num_stages
        if self.stage is not None and not self.stage < n:
            raise self.invalid("stage", f"must be 'auto' or an int in [0, {n}), got {self.stage!r}")
        if self.next_step_hold_s >= self.rpc_timeout_s:
            raise self.invalid("next_step_hold_s", f"must be below rpc_timeout_s ({self.rpc_timeout_s})")


def parse_stage(text: str) -> int | None:
    """``auto`` -> None, else an int stage index."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"stage must be 'auto' or a stage index, got {text!r}") from None
