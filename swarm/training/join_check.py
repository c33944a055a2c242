"""The join check: a node refuses to join only when the live, owner-signed records of the run name disagree.

Each node of a run publishes, besides its `PeerRecord` under ``{run}/peers`` (which carries its config hash), a
`RunConfigRecord` ``{hash, config}`` under ``runs/{name}/config``: a dictionary of owner-signed subkeys
(``[owner:<PeerID>]``), one per node, refreshed with its peer record and expiring like it (two record periods).
The run id holds a hash prefix, so a peer of the same name with another config publishes its peer record under
another ``{run}/peers`` key; the name-level key is where a joining node finds it.

The rule (`check_join`), over the distinct live signers other than this node, one vote each:

- a signer of a ``runs/{name}/config`` entry votes for the entry's hash, if the hash is the SHA-256 of the entry's
  config (an entry whose hash does not match its config is skipped);
- a signer with no such entry whose live `PeerRecord` under this node's ``{run}/peers`` carries this node's hash
  votes for it;
- the node is refused (ConfigError naming the first differing field) only when a strict majority of the votes
  disagree with its hash. A tie, or no vote at all, joins.

So an unowned write counts for nothing (the schema refuses it on every node), and one attacker identity with a
wrong config is outvoted by two honest nodes (and tied by one). What the rule cannot do is tell a lone attacker from
a real one-node swarm: the first node of a run name is refused while a live identity publishes another config
under that name (the misconfigured second node of a one-node swarm must be refused the same way).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from swarm.dht.schema import Entry
from swarm.errors import ConfigError
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig, canonical_hash
from swarm.training.messages import PeerRecord, RunConfigRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigVotes:
    """Who votes for which config hash (one vote per signer), and one config of each hash seen in an entry."""

    me: PeerID  # the joining node (which never votes)
    votes: dict[PeerID, str]
    configs: dict[str, dict[str, Any]]

    def tally(self, mine: str) -> tuple[int, int]:
        """(votes for ``mine``, votes for any other hash)."""
        agree = sum(1 for h in self.votes.values() if h == mine)
        return agree, len(self.votes) - agree


def collect_votes(
    config_entries: Iterable[Entry], peer_entries: Iterable[Entry], *, me: PeerID, my_hash: str, now: float
) -> ConfigVotes:
    """The votes of the live signed entries of ``runs/{name}/config`` and of this node's ``{run}/peers`` (as
    `RecordSchema.entries` gives them): see the module docstring. ``now`` is wall-clock time."""
    votes: dict[PeerID, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for entry in config_entries:
        record = entry.value
        if entry.owner is None or entry.owner == me or entry.expiration_time <= now:
            continue
        if not isinstance(record, RunConfigRecord) or canonical_hash(record.config) != record.hash:
            log.warning(
                "%s: skipping %s's run config entry: its hash is not its config's", me.short(), entry.owner.short()
            )
            continue
        votes[entry.owner] = record.hash
        configs.setdefault(record.hash, record.config)
    for entry in peer_entries:
        record = entry.value
        if entry.owner is None or entry.owner == me or entry.owner in votes or entry.expiration_time <= now:
            continue
        if isinstance(record, PeerRecord) and record.config_hash == my_hash:
            votes[entry.owner] = my_hash
    return ConfigVotes(me=me, votes=votes, configs=configs)


def check_join(run: RunConfig, votes: ConfigVotes) -> None:
    """ConfigError naming the first field where ``run`` differs from the swarm's config, if a strict majority of
    the votes disagree with ``run``'s hash (the config the most of them hold; ties: the smallest hash)."""
    mine = run.config_hash()
    agree, disagree = votes.tally(mine)
    if disagree <= agree:
        if disagree:
            log.warning(
                "%s: %d live peer(s) of run %s publish another config; %d agree with this node's, so it joins",
                votes.me.short(),
                disagree,
                run.name,
                agree,
            )
        return
    counts = Counter(h for h in votes.votes.values() if h != mine)
    top = min(counts, key=lambda h: (-counts[h], h))
    run.check_same_run(votes.configs[top])
    raise ConfigError(  # equal field by field, yet another canonical form (e.g. 1 and 1.0): still another run
        f"run config differs from the swarm's (hash {top[:12]}, this node {mine[:12]}); start the node with the "
        f"swarm's run config"
    )
