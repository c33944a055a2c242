"""AveragerConfig: group sizes, deadlines, part size, codec and reduction of the averager, validated up front."""

from __future__ import annotations

import math

from swarm.averaging.messages import MAX_GROUP_RECORD_TTL_S
from swarm.averaging.reducer import ReductionConfig
from swarm.configs import Config, limits_of, setting

DEFAULT_PART_SIZE_BYTES = 512 * 1024


class AveragerConfig(Config, section="averager"):
    """Everything an :class:`~swarm.averaging.Averager` needs besides its transport and DHT (durations in seconds).

    A leader stops gathering at ``target_group_size``; below ``min_group_size`` a peer averages alone. Spans are
    proportional to ``bandwidth`` when every member announces one. ``inspect_parts`` returns every member's values
    of the first N parts of our span in `AveragingResult.inspected`, to check for outlier or replayed gradients.
    """

    target_group_size: int = setting(default=16, ge=1, le=256, doc="A leader closes the group at this many peers.")
    min_group_size: int = setting(default=2, ge=1, le=256, doc="Below this many peers, average alone.")
    matchmaking_time_s: float = setting(default=5.0, gt=0, le=86400, doc="How long a leader gathers peers.")
    join_timeout_s: float = setting(
        default=5.0, gt=0, le=86400, doc="How long a follower waits for the leader's final membership."
    )
    allreduce_timeout_s: float = setting(default=60.0, gt=0, le=86400, doc="Deadline of the exchange itself.")
    part_timeout_s: float = setting(
        default=10.0, gt=0, le=86400, doc="Longest wait for one part from one peer before it is dropped as stalled."
    )
    rpc_timeout_s: float = setting(default=5.0, gt=0, le=86400, doc="Deadline of one matchmaking request.")
    part_size_bytes: int = setting(
        default=DEFAULT_PART_SIZE_BYTES, ge=4096, le=8 * 1024 * 1024, doc="Size of one part before compression."
    )
    codec: str = setting(default="none", doc="Codec of the all-reduce parts (the run config's codecs.allreduce).")
    bandwidth: float | None = setting(
        default=None, gt=0, lt=math.inf, doc="Announced to the group; spans follow it when all announce one."
    )
    client_mode: bool = setting(default=False, doc="Send and receive, but own (reduce) no span.")
    reduction: str = setting(
        default="mean", limits=limits_of(ReductionConfig, "reduction"), doc="mean or centered_clip."
    )
    clip_tau: float = setting(
        default=1.0, limits=limits_of(ReductionConfig, "clip_tau"), doc="centered_clip: clipping radius."
    )
    clip_iterations: int = setting(
        default=20, limits=limits_of(ReductionConfig, "clip_iterations"), doc="centered_clip: fixed-point iterations."
    )
    inspect_parts: int = setting(
        default=0, limits=limits_of(ReductionConfig, "inspect_parts"), doc="Keep every member's values of N parts."
    )
    record_ttl_s: float = setting(
        default=120.0,
        gt=0,
        le=MAX_GROUP_RECORD_TTL_S,
        doc="Lifetime of the matchmaking record (nodes refuse group entries that live longer).",
    )
    poll_interval_s: float = setting(default=0.25, gt=0, le=86400, doc="Seconds between polls of the DHT.")

    def validate(self) -> None:
        if self.min_group_size > self.target_group_size:
            raise self.invalid(
                "min_group_size", f"({self.min_group_size}) must be <= target_group_size ({self.target_group_size})"
            )
        if not self.codec:
            raise self.invalid(
                "codec", f"must be a codec name such as 'none', 'fp16', 'blockwise8', got {self.codec!r}"
            )

    def reduction_config(self) -> ReductionConfig:
        """The owner's reduction settings."""
        return ReductionConfig(
            reduction=self.reduction,
            clip_tau=self.clip_tau,
            clip_iterations=self.clip_iterations,
            inspect_parts=self.inspect_parts,
        )
