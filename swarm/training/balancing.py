"""Self-assignment and rebalancing of stages (pure functions over a snapshot of the swarm).

A stage's throughput is the sum of its peers' throughputs (samples/s); the swarm's throughput is its
bottleneck, the minimum over stages. A peer's throughput on a stage is its speed divided by the stage's
compute cost. A joining node takes the stage where it raises the bottleneck most (the stage with the least
throughput relative to the node's cost there). A serving node moves only if that raises the bottleneck by a
clear margin (Petals' rule: old minimum < ``move_margin`` x new minimum) and never leaves its stage empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """``move_margin``: move only if old bottleneck < margin x new; a peer with no measurement counts as
    ``default_throughput``."""

    move_margin: float = 0.75
    default_throughput: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.move_margin, (int, float)) or not 0 < self.move_margin <= 1:
            raise ConfigError(f"move_margin must be in (0, 1], got {self.move_margin!r}")
        if not isinstance(self.default_throughput, (int, float)) or not self.default_throughput > 0:
            raise ConfigError(f"default_throughput must be > 0, got {self.default_throughput!r}")


@dataclass(frozen=True, kw_only=True)
class StagePeer:
    """One peer in the snapshot: the stage it serves and its throughput there (samples/s)."""

    peer: str
    stage: int
    throughput: float


def stage_throughputs(peers: Sequence[StagePeer], num_stages: int) -> list[float]:
    """Sum of peer throughputs per stage (0.0 for an empty stage)."""
    totals = [0.0] * num_stages
    for p in peers:
        if 0 <= p.stage < num_stages:
            totals[p.stage] += max(p.throughput, 0.0)
    return totals


def choose_stage(
    peers: Sequence[StagePeer], num_stages: int, *, my_speed: float, stage_costs: Sequence[float] | None = None
) -> int:
    """The stage a joining node should take: an empty stage first, else the one maximising the new bottleneck."""
    costs = _costs(stage_costs, num_stages)
    totals = stage_throughputs(peers, num_stages)
    best_stage, best_key = 0, None
    for s in range(num_stages):
        new = list(totals)
        new[s] += my_speed / costs[s]
        key = (min(new), -totals[s] * costs[s], -s)
        if best_key is None or key > best_key:
            best_stage, best_key = s, key
    return best_stage


def choose_move(
    peers: Sequence[StagePeer],
    num_stages: int,
    *,
    me: str,
    cfg: BalanceConfig,
    stage_costs: Sequence[float] | None = None,
) -> int | None:
    """The stage to move to, or None to stay: never empties a stage; needs old min < margin x new min."""
    costs = _costs(stage_costs, num_stages)
    mine = next((p for p in peers if p.peer == me), None)
    if mine is None:
        return None
    if sum(1 for p in peers if p.stage == mine.stage) <= 1:
        return None
    totals = stage_throughputs(peers, num_stages)
    old_min = min(totals)
    my_speed = max(mine.throughput, 0.0) * costs[mine.stage]
    best: tuple[float, int] | None = None
    for s in range(num_stages):
        if s == mine.stage:
            continue
        new = list(totals)
        new[mine.stage] -= max(mine.throughput, 0.0)
        new[s] += my_speed / costs[s]
        if best is None or min(new) > best[0]:
            best = (min(new), s)
    if best is not None and old_min < cfg.move_margin * best[0]:
        return best[1]
    return None


def _costs(stage_costs: Sequence[float] | None, num_stages: int) -> list[float]:
    if stage_costs is None:
        return [1.0] * num_stages
    if len(stage_costs) != num_stages or any(c <= 0 for c in stage_costs):
        raise ConfigError(f"stage_costs must be {num_stages} positive numbers, got {list(stage_costs)!r}")
    return list(stage_costs)


def peers_by_stage(peers: Sequence[StagePeer], num_stages: int) -> Mapping[int, list[str]]:
    """The PeerIDs serving each stage, sorted."""
    out: dict[int, list[str]] = {s: [] for s in range(num_stages)}
    for p in peers:
        if 0 <= p.stage < num_stages:
            out[p.stage].append(p.peer)
    return {s: sorted(v) for s, v in out.items()}
