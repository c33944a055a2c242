"""`TrainingConfig`: the training role of one node (`swarm.training.trainer.TrainingRole`), validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarm.training.balancing import BalanceConfig
from swarm.run.config import RunConfig
from swarm.training.driver import DriverConfig
from swarm.errors import ConfigError
from swarm.training.messages import MAX_PEER_RECORD_TTL_S, MAX_RECORD_PERIOD_S
from swarm.training.node_role import TRAINING_ROLES, Role
from swarm.training.verifying import NodeVerificationConfig
from swarm.training.wiring import WiringConfig

DEVICES = ("cpu", "cuda", "mps")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The training role of one node. Durations in seconds."""

    run: RunConfig
    stage: int | None = None
    role: Role = Role.AUTO  # a string is parsed: auto, server or trainer
    device: str = "cpu"
    checkpoint_dir: Path | None = None
    save_every_steps: int = 5
    max_steps: int | None = None
    summary_path: Path | None = None
    record_period_s: float = 5.0
    poll_interval_s: float = 0.2
    view_interval_s: float = 0.2
    rpc_timeout_s: float = 10.0
    dht_timeout_s: float = 5.0
    inflight_microbatches: int = 2
    matchmaking_time_s: float = 3.0
    allreduce_timeout_s: float = 30.0
    behind_grace_s: float = 5.0
    rebalance_interval_s: float = 20.0
    start_after_peers: int = 0
    finish_linger_s: float = 60.0  # after max_steps, keep serving validators until the last window is attested
    seed: int = 0
    wiring: WiringConfig = field(default_factory=WiringConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    verification: NodeVerificationConfig = field(default_factory=NodeVerificationConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.run, RunConfig):
            raise ConfigError(f"run must be a RunConfig, got {type(self.run).__name__}")
        n = self.run.pipeline.num_stages
        if self.stage is not None and (not isinstance(self.stage, int) or not 0 <= self.stage < n):
            raise ConfigError(f"stage must be 'auto' or an int in [0, {n}), got {self.stage!r}")
        object.__setattr__(self, "role", Role.parse(self.role, allowed=TRAINING_ROLES))
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ConfigError(f"max_steps must be None or an int >= 1, got {self.max_steps!r}")
        for name in ("save_every_steps", "inflight_microbatches"):
            if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= 10_000:
                raise ConfigError(f"{name} must be an int in [1, 10000], got {getattr(self, name)!r}")
        if not isinstance(self.record_period_s, (int, float)) or not 0 < self.record_period_s <= MAX_RECORD_PERIOD_S:
            raise ConfigError(
                f"record_period_s must be a number of seconds in (0, {MAX_RECORD_PERIOD_S:.0f}] (a peer record "
                f"lives two periods, and nodes refuse ones that live longer than {MAX_PEER_RECORD_TTL_S:.0f} s), "
                f"got {self.record_period_s!r}"
            )
        for name in (
            "poll_interval_s",
            "view_interval_s",
            "rpc_timeout_s",
            "dht_timeout_s",
            "matchmaking_time_s",
            "allreduce_timeout_s",
            "behind_grace_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        if not isinstance(self.start_after_peers, int) or not 0 <= self.start_after_peers <= 100_000:
            raise ConfigError(f"start_after_peers must be an int in [0, 100000], got {self.start_after_peers!r}")
        if not isinstance(self.finish_linger_s, (int, float)) or not 0 <= self.finish_linger_s <= 86400:
            raise ConfigError(
                f"finish_linger_s must be in [0, 86400] seconds (0: leave at once), got {self.finish_linger_s!r}"
            )
        if not isinstance(self.rebalance_interval_s, (int, float)) or not 0 <= self.rebalance_interval_s <= 86400:
            raise ConfigError(
                f"rebalance_interval_s must be in [0, 86400] (0 disables), got {self.rebalance_interval_s!r}"
            )

    @property
    def drives(self) -> bool:
        """Trainers always drive; ``auto`` nodes drive while they serve stage 0."""
        return self.role in (Role.AUTO, Role.TRAINER)


def parse_stage(text: str) -> int | None:
    """``auto`` -> None, else an int stage index."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"stage must be 'auto' or a stage index, got {text!r}") from None
