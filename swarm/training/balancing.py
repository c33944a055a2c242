"""Self-assignment and rebalancing of stages (pure functions over a snapshot of the swarm).

A stage's throughput is the sum of its peers' throughputs (samples/s); the swarm's throughput is its
bottleneck, the minimum over stages. A peer's throughput on a stage is its speed divided by the stage's
compute cost. A joining node takes the stage where it raises the bottleneck most (the stage with the least
throughput relative to the node's cost there). A serving node moves only if that raises the bottleneck by a
clear margin (Petals' rule: old minimum < ``move_margin`` x new minimum) and never leaves its stage empty.

Reachability: to a node that can be dialled directly, a stage served only by peers behind NAT (reachable only
through relays) counts as empty, so a joining public node takes it, and a public node moves there from a stage
that keeps another peer: a stage is never left served only through relays while direct peers could serve it.
(A relayed peer's throughput is already measured through its relay: the drivers time every call.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.configs import Config, setting
from swarm.errors import ConfigError


class BalanceConfig(Config, section="balance"):
    """When a serving node moves to another stage (Petals' rule) and how an unmeasured peer counts."""

    move_margin: float = setting(default=0.75, gt=0, le=1, doc="Move only if old bottleneck < margin x new bottleneck.")
    default_throughput: float = setting(default=1.0, gt=0, doc="Throughput assumed for a peer never measured.")


@dataclass(frozen=True, kw_only=True)
class StagePeer:
    """One peer in the snapshot: the stage it serves and its throughput there (samples/s)."""

    peer: str
    stage: int
    throughput: float
    relayed: bool = False  # behind NAT: reachable only through relays (its PeerRecord says relayed or private)


def _relay_only_stages(peers: Sequence[StagePeer], num_stages: int) -> set[int]:
    """Stages that have peers, every one of them relayed."""
    served = {p.stage for p in peers if 0 <= p.stage < num_stages}
    return {s for s in served if all(p.relayed for p in peers if p.stage == s)}


def _totals_for(peers: Sequence[StagePeer], num_stages: int, *, relayed: bool) -> list[float]:
    """Stage throughputs as a node sees them: to a direct node, a relay-only stage counts 0 (it should go there)."""
    totals = stage_throughputs(peers, num_stages)
    if not relayed:
        for s in _relay_only_stages(peers, num_stages):
            totals[s] = 0.0
    return totals


def stage_throughputs(peers: Sequence[StagePeer], num_stages: int) -> list[float]:
    """Sum of peer throughputs per stage (0.0 for an empty stage)."""
    totals = [0.0] * num_stages
    for p in peers:
        if 0 <= p.stage < num_stages:
            totals[p.stage] += max(p.throughput, 0.0)
    return totals


def choose_stage(
    peers: Sequence[StagePeer],
    num_stages: int,
    *,
    my_speed: float,
    stage_costs: Sequence[float] | None = None,
    relayed: bool = False,
) -> int:
    """The stage a joining node should take: an empty stage first (for a direct node, a relay-only stage counts as
    empty), else the one maximising the new bottleneck."""
    costs = _costs(stage_costs, num_stages)
    totals = _totals_for(peers, num_stages, relayed=relayed)
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
    if not mine.relayed and mine.stage in _relay_only_stages(
        [p for p in peers if p.peer != mine.peer], num_stages
    ):  # leaving would leave the stage served only through relays
        return None
    totals = _totals_for(peers, num_stages, relayed=mine.relayed)
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
