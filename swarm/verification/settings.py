"""The ``[verification]`` section of the run config: every knob of checking and rewards, flat for TOML."""

from __future__ import annotations

from swarm.configs import Config, limits_of, setting
from swarm.errors import ConfigError
from swarm.p2p.identity import PeerID
from swarm.verification.compare import ToleranceConfig
from swarm.verification.election import ElectionConfig
from swarm.verification.outliers import OutlierConfig
from swarm.verification.replay import CheckConfig
from swarm.verification.retention import RetentionConfig
from swarm.verification.rewards import RewardConfig


class VerificationSettings(Config, section="verification"):
    """What every node of a run must agree on about verification (part of the run's hash).

    The ranges are those of the configs built from these settings (`tolerance`, `rewards`, ...).
    """

    enabled: bool = setting(default=True, doc="Whether receipts are kept and work is checked at all.")
    window_steps: int = setting(
        default=5, limits=limits_of(RewardConfig, "window_steps"), doc="Steps per reward window."
    )
    sample_probability: float = setting(
        default=0.1, limits=limits_of(CheckConfig, "sample_probability"), doc="Share of receipts a validator replays."
    )
    min_cosine: float = setting(
        default=0.99,
        limits=limits_of(ToleranceConfig, "min_cosine"),
        doc="Least cosine of a claimed and a replayed output.",
    )
    max_norm_ratio_deviation: float = setting(
        default=0.01,
        limits=limits_of(ToleranceConfig, "max_norm_ratio_deviation"),
        doc="Most relative difference of a claimed norm from the replayed one.",
    )
    retention_steps: int = setting(
        default=20, limits=limits_of(RetentionConfig, "window_steps"), doc="Steps of served work a server keeps."
    )
    retention_max_bytes: int = setting(
        default=512 * 1024 * 1024, limits=limits_of(RetentionConfig, "max_bytes"), doc="Most bytes of served work kept."
    )
    stage_costs: tuple[float, ...] = setting(
        default=(),
        limits=limits_of(RewardConfig, "stage_costs"),
        doc="Relative compute cost of each stage (missing: 1.0).",
    )
    backward_cost: float = setting(
        default=2.0, limits=limits_of(RewardConfig, "backward_cost"), doc="Cost of a backward relative to a forward."
    )
    trusted_validators: tuple[str, ...] = setting(default=(), doc="PeerIDs whose verdicts count.")
    outlier_distance_ratio: float = setting(
        default=10.0,
        limits=limits_of(OutlierConfig, "distance_ratio"),
        doc="A gradient farther than this x the median distance from the center is an outlier.",
    )
    outlier_min_reporters: int = setting(
        default=2,
        limits=limits_of(RewardConfig, "outlier_min_reporters"),
        doc="Reports that make a peer an offender (0: ignore reports).",
    )
    heartbeat_interval_s: float = setting(
        default=1.0,
        limits=limits_of(ElectionConfig, "heartbeat_interval_s"),
        doc="Seconds between candidates' heartbeats.",
    )
    heartbeat_ttl_s: float = setting(
        default=5.0,
        limits=limits_of(ElectionConfig, "heartbeat_ttl_s"),
        doc="Lifetime of a heartbeat (> the interval).",
    )
    settle_steps: int = setting(default=2, ge=0, le=1000, doc="Steps after a window closes before it is attested.")

    def validate(self) -> None:
        for text in self.trusted_validators:
            try:
                PeerID.from_base58(text)
            except Exception:
                raise self.invalid("trusted_validators", f"{text!r} is not a PeerID") from None
        if not self.heartbeat_interval_s < self.heartbeat_ttl_s:
            interval, ttl = self.heartbeat_interval_s, self.heartbeat_ttl_s
            raise self.invalid("heartbeat_ttl_s", f"must exceed heartbeat_interval_s ({interval}), got {ttl!r}")
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
