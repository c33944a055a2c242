"""`/api/status`: the JSON the status page polls: the swarm as the DHT shows it, not just this node.

Stages with their peers (role, step, throughput, reachability), the loss curves, samples/s, tokens/s and the ETA,
the recent attestations with each peer's share, and the flagged peers; all from the watcher's cache
(`swarm.observe.watcher`) and the node's own role, so building it never waits on the network.
"""

from __future__ import annotations

import time
from typing import Any

from swarm.observe.health import Health
from swarm.observe.source import NodeSource, max_steps, node_step, offenders, role_name, run_config, served_stage
from swarm.observe.watcher import SwarmWatcher
from swarm.p2p.identity import PeerID
from swarm.training.messages import PeerRecord

MAX_ATTESTATIONS_SHOWN = 8


def status_json(source: NodeSource, watcher: SwarmWatcher, health: Health, now: float) -> dict[str, Any]:
    """The status document (``now``: the watcher's monotonic clock)."""
    role = source.role()
    run = run_config(role)
    view = watcher.view
    step, limit = node_step(role), max_steps(role)
    samples_per_s = sum(r.samples_per_s for r in view.progress.values())
    return {
        "time": time.time(),
        "node": {
            "peer_id": source.me.to_base58(),
            "role": role_name(role, source),
            "stage": served_stage(role),
            "step": step,
            "health": health.to_json(),
        },
        "run": {"run_id": run.run_id, "name": run.name, "num_stages": run.pipeline.num_stages} if run else None,
        "records_age_s": round(now - watcher.view_at, 1) if watcher.view_at is not None else None,
        "step": step,
        "max_steps": limit,
        "samples_per_s": round(samples_per_s, 2),
        "tokens_per_s": round(samples_per_s * run.model.seq_len, 1) if run else 0.0,
        "eta_s": _eta_s(watcher, step, limit, run.batch.target_batch_size if run else 0, samples_per_s),
        "stages": [_stage(watcher, s) for s in range(run.pipeline.num_stages)] if run else [],
        "others": [_peer(watcher, p, r) for p, r in sorted(view.peers.items()) if r.stage is None],
        "loss_curve": watcher.curves.points(watcher.curves.train),
        "eval_curve": watcher.curves.points(watcher.curves.eval),
        "attestations": _attestations(watcher),
        "flagged": _flagged(source, watcher),
    }


def _eta_s(
    watcher: SwarmWatcher, step: int | None, limit: int | None, batch: int, samples_per_s: float
) -> float | None:
    """Seconds to ``max_steps``: from the observed step rate, else from samples/s and the batch size."""
    if step is None or limit is None:
        return None
    left = max(limit - step, 0)
    rate = watcher.steps.steps_per_s()
    if rate:
        return round(left / rate, 1)
    return round(left * batch / samples_per_s, 1) if samples_per_s > 0 else None


def _peer(watcher: SwarmWatcher, peer: PeerID, record: PeerRecord) -> dict[str, Any]:
    reach = watcher.reach.get(peer)
    return {
        "peer_id": peer.to_base58(),
        "role": str(record.role),
        "step": record.step,
        "throughput": round(record.throughput, 2),
        "reachable": reach.reachable if reach is not None else None,
        "rtt_ms": reach.rtt_ms if reach is not None else None,
    }


def _stage(watcher: SwarmWatcher, stage: int) -> dict[str, Any]:
    peers = [_peer(watcher, p, r) for p, r in sorted(watcher.view.peers.items()) if r.stage == stage]
    return {
        "stage": stage,
        "peers": peers,
        "throughput": round(sum(p["throughput"] for p in peers), 2),
        "step": max((p["step"] for p in peers), default=None),
        "reachable": sum(1 for p in peers if p["reachable"]),
    }


def _attestations(watcher: SwarmWatcher) -> list[dict[str, Any]]:
    shown = []
    for facts in watcher.attested()[:MAX_ATTESTATIONS_SHOWN]:
        att = facts.attestation
        if att is None:
            continue
        shown.append(
            {
                "window": facts.window,
                "orchestrator": att.orchestrator_id.to_base58(),
                "shares": [
                    {"peer_id": p.to_base58(), "share": round(s, 6)}
                    for p, s in sorted(att.share_map().items(), key=lambda item: -item[1])
                ],
                "flagged": sorted(PeerID(p).to_base58() for p in att.flagged),
            }
        )
    return shown


def _flagged(source: NodeSource, watcher: SwarmWatcher) -> list[dict[str, Any]]:
    """Peers flagged by an attestation (``attestation``, with the windows) or caught by this node (``this node``)."""
    found: dict[str, dict[str, Any]] = {}
    for facts in watcher.attested():
        for raw in facts.attestation.flagged if facts.attestation else []:
            entry = found.setdefault(PeerID(raw).to_base58(), {"by": "attestation", "windows": []})
            entry["windows"].append(facts.window)
    for peer in offenders(source.role()):
        found.setdefault(peer.to_base58(), {"by": "this node", "windows": []})
    return [{"peer_id": p, **v} for p, v in sorted(found.items())]
