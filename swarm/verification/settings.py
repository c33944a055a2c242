"""The ``[verification]`` section of the run config: every knob of checking and rewards, flat for TOML."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError
from swarm.verification.compare import ToleranceConfig
from swarm.verification.election import ElectionConfig
from swarm.verification.outliers import OutlierConfig
from swarm.verification.replay import CheckConfig
from swarm.verification.retention import RetentionConfig
from swarm.verification.rewards import RewardConfig


@dataclass(frozen=True, kw_only=True)
class VerificationSettings:
    """What every node of a run must agree on about verification (part of the run's hash)."""

    enabled: bool = True
    window_steps: int = 5
    sample_probability: float = 0.1
    min_cosine: float = 0.99
    max_norm_ratio_deviation: float = 0.01
    retention_steps: int = 20
    retention_max_bytes: int = 512 * 1024 * 1024
    stage_costs: tuple[float, ...] = ()
    backward_cost: float = 2.0
    trusted_validators: tuple[str, ...] = ()
    outlier_distance_ratio: float = 10.0
    outlier_min_reporters: int = 2
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    settle_steps: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"verification.enabled must be true or false, got {self.enabled!r}")
        object.__setattr__(self, "stage_costs", tuple(self.stage_costs))
        object.__setattr__(self, "trusted_validators", tuple(self.trusted_validators))
        try:
            self.tolerance()
            self.check()
            self.rewards()
            self.election()
            self.outliers()
            self.retention()
        except ConfigError as e:
            raise ConfigError(f"verification.{e}") from None
        if not isinstance(self.settle_steps, int) or not 0 <= self.settle_steps <= 1000:
            raise ConfigError(f"verification.settle_steps must be an int in [0, 1000], got {self.settle_steps!r}")
        if self.retention_steps <= self.window_steps + self.settle_steps:
            raise ConfigError(
                f"verification.retention_steps ({self.retention_steps}) must exceed window_steps + settle_steps "
                f"({self.window_steps + self.settle_steps}) so servers still hold a window's work when it is checked"
            )

    def last_attestable_window(self, max_steps: int) -> int:
        """For a run that stops at ``max_steps``: the last window closing ``settle_steps`` before the end (-1: none)."""
        return (max_steps - self.settle_steps) // self.window_steps - 1

    def tolerance(self) -> ToleranceConfig:
        return ToleranceConfig(min_cosine=self.min_cosine, max_norm_ratio_deviation=self.max_norm_ratio_deviation)

    def check(self) -> CheckConfig:
        return CheckConfig(sample_probability=self.sample_probability, tolerance=self.tolerance())

    def rewards(self) -> RewardConfig:
        return RewardConfig(
            window_steps=self.window_steps,
            stage_costs=self.stage_costs,
            backward_cost=self.backward_cost,
            trusted_validators=self.trusted_validators,
            outlier_min_reporters=self.outlier_min_reporters,
        )

    def election(self) -> ElectionConfig:
        return ElectionConfig(heartbeat_interval_s=self.heartbeat_interval_s, heartbeat_ttl_s=self.heartbeat_ttl_s)

    def outliers(self) -> OutlierConfig:
        return OutlierConfig(distance_ratio=self.outlier_distance_ratio)

    def retention(self) -> RetentionConfig:
        return RetentionConfig(window_steps=self.retention_steps, max_bytes=self.retention_max_bytes)
