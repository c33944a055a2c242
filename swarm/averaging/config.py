"""AveragerConfig: group sizes, deadlines, part size, codec and reduction of the averager, validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.averaging.messages import MAX_GROUP_RECORD_TTL_S
from swarm.averaging.reducer import ReductionConfig
from swarm.errors import ConfigError

DEFAULT_PART_SIZE_BYTES = 512 * 1024


def _positive_seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
        raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AveragerConfig:
    """Everything an :class:`~swarm.averaging.Averager` needs besides its transport and DHT.

    - ``target_group_size`` / ``min_group_size``: a leader stops gathering at the target; below the minimum
      a peer averages alone.
    - ``matchmaking_time_s``: how long a peer gathers others under the key before the leader closes the group.
    - ``join_timeout_s``: how long a follower waits for the leader's final membership after accepting.
    - ``allreduce_timeout_s``: the deadline of the exchange itself; ``part_timeout_s``: the longest wait for
      one part from one peer before it is dropped as stalled.
    - ``part_size_bytes``: the size of one part (one chunk on the wire) before compression.
    - ``codec``: the ``compression`` codec name for all-reduce chunks (the run config's allreduce codec).
    - ``bandwidth``: announced to the group; spans are proportional when every member announces one.
    - ``client_mode``: this peer sends and receives but owns (reduces) no span.
    - ``reduction``: ``mean`` or ``centered_clip`` (with ``clip_tau`` and ``clip_iterations``).
    - ``inspect_parts``: keep every member's values of the first N parts of our span and return them in
      `AveragingResult.inspected`, so the caller can check for outlier or replayed gradients.
    - ``record_ttl_s``: lifetime of this peer's matchmaking record in the DHT (at most 3600 s).
    - ``max_part_bytes``: the largest encoded chunk accepted from a peer.
    """

    target_group_size: int = 16
    min_group_size: int = 2
    matchmaking_time_s: float = 5.0
    join_timeout_s: float = 5.0
    allreduce_timeout_s: float = 60.0
    part_timeout_s: float = 10.0
    rpc_timeout_s: float = 5.0
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    codec: str = "none"
    bandwidth: float | None = None
    client_mode: bool = False
    reduction: str = "mean"
    clip_tau: float = 1.0
    clip_iterations: int = 20
    inspect_parts: int = 0
    record_ttl_s: float = 120.0
    poll_interval_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("target_group_size", "min_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
                raise ConfigError(f"{name} must be an int in [1, 256], got {value!r}")
        if self.min_group_size > self.target_group_size:
            raise ConfigError(
                f"min_group_size ({self.min_group_size}) must be <= target_group_size ({self.target_group_size})"
            )
        for name in (
            "matchmaking_time_s",
            "join_timeout_s",
            "allreduce_timeout_s",
            "part_timeout_s",
            "rpc_timeout_s",
            "record_ttl_s",
            "poll_interval_s",
        ):
            _positive_seconds(name, getattr(self, name))
        if self.record_ttl_s > MAX_GROUP_RECORD_TTL_S:
            raise ConfigError(
                f"record_ttl_s must be at most {MAX_GROUP_RECORD_TTL_S:.0f} s (nodes refuse group entries that live "
                f"longer), got {self.record_ttl_s!r}"
            )
        size = self.part_size_bytes
        if not isinstance(size, int) or isinstance(size, bool) or not 4096 <= size <= 8 * 1024 * 1024:
            raise ConfigError(f"part_size_bytes must be an int in [4096, 8388608], got {size!r}")
        if not isinstance(self.codec, str) or not self.codec:
            raise ConfigError(f"codec must be a codec name such as 'none', 'fp16', 'blockwise8', got {self.codec!r}")
        bw = self.bandwidth
        if bw is not None and (not isinstance(bw, (int, float)) or isinstance(bw, bool) or not (0 < bw < math.inf)):
            raise ConfigError(f"bandwidth must be None or a finite number > 0, got {bw!r}")
        if not isinstance(self.client_mode, bool):
            raise ConfigError(f"client_mode must be a bool, got {self.client_mode!r}")
        self.reduction_config()  # validates reduction, clip_tau, clip_iterations

    def reduction_config(self) -> ReductionConfig:
        """The owner's reduction settings."""
        return ReductionConfig(
            reduction=self.reduction,
            clip_tau=self.clip_tau,
            clip_iterations=self.clip_iterations,
            inspect_parts=self.inspect_parts,
        )
