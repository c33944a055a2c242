"""The swarm as seen in the DHT: stage records (`PeerRecord`) and progress records, parsed and summarised.

Used by the trainer (whom to call, whom to average with, where to download state), by `swarm-dht stages` and by
the launcher's live table. Records are signed by their owners (the DHT checks the ``[owner:...]`` subkey); entries
are read with the keys' schemas (`PEERS_SCHEMA`, `PROGRESS_SCHEMA`), which skip malformed ones with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from swarm.p2p.identity import PeerID
from swarm.training.node_role import Role
from swarm.training.messages import PEERS_SCHEMA, PeerRecord
from swarm.training.progress import PROGRESS_SCHEMA, ProgressRecord, step_samples

log = logging.getLogger(__name__)


@dataclass
class SwarmView:
    """A snapshot: each peer's stage record and each driver's progress."""

    peers: dict[PeerID, PeerRecord] = field(default_factory=dict)
    progress: dict[PeerID, ProgressRecord] = field(default_factory=dict)

    @classmethod
    def parse(cls, peers_value: Any, progress_value: Any) -> SwarmView:
        view = cls()
        for entry in PEERS_SCHEMA.entries(peers_value):
            if entry.owner is not None and isinstance(entry.value, PeerRecord):
                view.peers[entry.owner] = entry.value
        for entry in PROGRESS_SCHEMA.entries(progress_value):
            if entry.owner is not None and isinstance(entry.value, ProgressRecord):
                view.progress[entry.owner] = entry.value
        return view

    def take_progress(self, peer: PeerID, record: ProgressRecord) -> bool:
        """Take ``record`` as ``peer``'s progress unless the view holds a newer one (by the record's ``time``)."""
        held = self.progress.get(peer)
        if held is not None and held.time >= record.time:
            return False
        self.progress[peer] = record
        return True

    def keep_newer_progress(self, before: SwarmView, *, now: float, max_age_s: float) -> None:
        """Keep the progress records of ``before`` (told directly, or this node's own) that are newer than this
        view's (read from the DHT, whose copy is stored in the background) and younger than ``max_age_s``."""
        for peer, record in before.progress.items():
            if now - record.time < max_age_s:
                self.take_progress(peer, record)

    def stage_peers(self, stage: int) -> list[PeerID]:
        """PeerIDs serving ``stage`` (sorted)."""
        return sorted(p for p, r in self.peers.items() if r.stage == stage)

    def step_samples(self, step: int) -> int:
        return step_samples(self.progress.values(), step)

    def drivers(self) -> list[PeerID]:
        """The drivers (trainers, and auto-role peers of stage 0), sorted."""
        return sorted(
            p for p, r in self.peers.items() if r.role == Role.TRAINER or (r.role == Role.AUTO and r.stage == 0)
        )

    def latest_eval(self) -> tuple[int, float] | None:
        """The newest validation loss in the progress records: (the step of its weights, the loss)."""
        evals = [(r.eval_step, r.eval_loss) for r in self.progress.values() if r.eval_step is not None]
        return max(((s, loss) for s, loss in evals if loss is not None), default=None)

    def newest_step(self, stage: int, exclude: Collection[PeerID] = ()) -> tuple[PeerID | None, int]:
        """The peer of ``stage`` with the newest step (peers in ``exclude`` left out), and that step."""
        best: tuple[PeerID | None, int] = (None, -1)
        for p, r in self.peers.items():
            if r.stage == stage and r.step > best[1] and p not in exclude:
                best = (p, r.step)
        return best

    def summary(self, num_stages: int) -> dict[str, Any]:
        """Per stage: peers, throughput, step; overall: newest step, latest losses, the newest validation loss
        (``eval``: (step, loss) or None), samples/s."""
        stages = []
        for s in range(num_stages):
            recs = [(p, r) for p, r in self.peers.items() if r.stage == s]
            stages.append(
                {
                    "stage": s,
                    "peers": sorted(p.to_base58() for p, _ in recs),
                    "throughput": round(sum(r.throughput for _, r in recs), 3),
                    "step": max((r.step for _, r in recs), default=None),
                }
            )
        losses = [r.loss for r in self.progress.values() if r.loss is not None]
        return {
            "stages": stages,
            "trainers": sorted(p.to_base58() for p, r in self.peers.items() if r.stage is None),
            "step": max((r.step for r in self.progress.values()), default=None),
            "loss": sum(losses) / len(losses) if losses else None,
            "eval": self.latest_eval(),
            "samples_per_s": round(sum(r.samples_per_s for r in self.progress.values()), 3),
        }


def format_table(summary: dict[str, Any], *, eta_s: float | None = None) -> str:
    """The per-stage table shown by `swarm-node local` and `swarm-dht stages`."""
    lines = [f"{'stage':>5}  {'peers':>5}  {'samples/s':>9}  {'step':>5}  peer ids"]
    for st in summary["stages"]:
        ids = ", ".join(p[-6:] for p in st["peers"]) or "(none: waiting for a peer)"
        step = "-" if st["step"] is None else str(st["step"])
        lines.append(f"{st['stage']:>5}  {len(st['peers']):>5}  {st['throughput']:>9.1f}  {step:>5}  {ids}")
    loss = summary.get("loss")
    tail = f"step {summary.get('step')}  loss {loss:.3f}" if loss is not None else f"step {summary.get('step')}  loss -"
    evaluated = summary.get("eval")
    if evaluated is not None:
        tail += f"  eval {evaluated[1]:.3f} (step {evaluated[0]})"
    tail += f"  samples/s {summary.get('samples_per_s', 0.0):.1f}"
    if eta_s is not None:
        tail += f"  ETA {eta_s:.0f}s"
    return "\n".join([*lines, tail])
