"""`/health`: whether this node does its job, as a load balancer or a supervisor asks it.

Healthy (HTTP 200) when the node serves (a stage; a trainer drives, a validator validates), its step advanced in
the last ``stall_s`` (or it reached ``max_steps``), its stage has ``min_stage_peers`` peers (itself included) in
the records it acts on, and its last read of the DHT succeeded. Otherwise 503, with every reason found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swarm.observe.config import HttpConfig
from swarm.observe.source import NodeSource, max_steps, node_step, role_name, role_view, served_stage, serves
from swarm.observe.watcher import SwarmWatcher


@dataclass(frozen=True)
class Health:
    """The verdict and what it rests on (the JSON body of /health)."""

    reasons: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unhealthy", "reasons": self.reasons, **self.facts}


def check_health(cfg: HttpConfig, source: NodeSource, watcher: SwarmWatcher, now: float) -> Health:
    """The node's health now (``now``: the watcher's monotonic clock)."""
    role = source.role()
    step, stage = node_step(role), served_stage(role)
    watcher.steps.observe(step, now)
    reasons: list[str] = []
    if source.dht() is None or (source.expects_role and role is None):
        reasons.append("not serving yet: the node is still joining")
    elif source.expects_role and not serves(role):
        reasons.append("not serving: the node serves no stage now (joining one, or between stages)")
    finished = step is not None and (limit := max_steps(role)) is not None and step >= limit
    age_s = watcher.steps.age_s(now)
    if role is not None and not finished and age_s > cfg.stall_s:
        reasons.append(f"stuck: step {step} has not advanced for {age_s:.0f}s (limit {cfg.stall_s:.0f}s)")
    view = role_view(role)
    if stage is not None and view is not None:
        peers = [p for p in view.stage_peers(stage) if p != source.me]
        if len(peers) + 1 < cfg.min_stage_peers:
            reasons.append(f"alone in its stage: stage {stage} has {len(peers)} other peer(s) in the records")
    stale_s = 3 * cfg.refresh_s + cfg.dht_timeout_s
    if watcher.dht_error is not None and source.dht() is not None:
        reasons.append(f"cannot reach the DHT: {watcher.dht_error}")
    elif watcher.view_at is not None and now - watcher.view_at > stale_s:
        reasons.append(f"cannot reach the DHT: no read of the run's records for {now - watcher.view_at:.0f}s")
    facts = {
        "peer_id": source.me.to_base58(),
        "role": role_name(role, source),
        "stage": stage,
        "step": step,
        "step_age_s": round(age_s, 1),
        "dht_read_age_s": round(now - watcher.view_at, 1) if watcher.view_at is not None else None,
    }
    return Health(reasons, facts)
