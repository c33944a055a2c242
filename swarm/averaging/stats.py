"""What this node's averaging rounds came to (`AveragingStats`): counts the metrics endpoint reads.

`swarm.averaging.averager.Averager.step` records each round once it ends: the agreed group's size, whether it
averaged with others, and whether it failed (passed its deadline, or a peer fault broke it before any exchange).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AveragingStats:
    """Counters of one averager's rounds. ``group_sizes`` maps an agreed group's size to how many rounds had it."""

    rounds: int = 0
    alone: int = 0  # rounds that averaged with nobody (no group formed, everyone lost, or a failure)
    failures: int = 0  # rounds that passed their deadline or broke on a peer fault
    lost_peers: int = 0  # members lost part-way, over every round
    last_group_size: int = 0
    group_sizes: dict[int, int] = field(default_factory=dict)

    def record(self, *, group_size: int, with_others: bool, failed: bool = False, lost_peers: int = 0) -> None:
        self.rounds += 1
        self.alone += 0 if with_others else 1
        self.failures += 1 if failed else 0
        self.lost_peers += lost_peers
        self.last_group_size = group_size
        self.group_sizes[group_size] = self.group_sizes.get(group_size, 0) + 1
