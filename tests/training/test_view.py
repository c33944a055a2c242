"""SwarmView: the run's records parsed from DHT answers; malformed or foreign entries are skipped."""

from __future__ import annotations

from swarm.p2p.identity import Identity
from swarm.dht.keys import owner_subkey
from swarm.dht.records import ValueWithExpiration
from swarm.training.messages import PeerRecord
from swarm.training.progress import ProgressRecord
from swarm.training.view import SwarmView, format_table


def test_view_parses_records_and_skips_malformed_ones() -> None:
    a, b, c = (Identity.from_seed(bytes([i]) * 32).peer_id for i in (1, 2, 3))
    record = PeerRecord(role="auto", stage=1, maddrs=["/ip4/127.0.0.1/tcp/1"], throughput=5.0, step=7, config_hash="h")
    peers = {
        owner_subkey(a): ValueWithExpiration(record.to_wire(), 1e12),
        owner_subkey(b): ValueWithExpiration({**record.to_wire(), "role": "emperor"}, 1e12),  # bad role
        "not-an-owner": ValueWithExpiration(record.to_wire(), 1e12),
        owner_subkey(c): ValueWithExpiration({**record.to_wire(), "stage": 0, "step": 3}, 1e12),
    }
    progress = {
        owner_subkey(c): ValueWithExpiration(
            ProgressRecord(step=3, samples=32, samples_per_s=9.0, loss=2.5).to_wire(), 1e12
        ),
        owner_subkey(a): ValueWithExpiration({"step": 3}, 1e12),
    }
    view = SwarmView.parse(peers, progress)
    assert set(view.peers) == {a, c}
    assert view.stage_peers(1) == [a] and view.newest_step(1) == (a, 7)
    assert view.step_samples(3) == 32 and set(view.progress) == {c}
    summary = view.summary(2)
    assert [len(s["peers"]) for s in summary["stages"]] == [1, 1] and summary["loss"] == 2.5
    assert "stage" in format_table(summary)
    assert SwarmView.parse(None, "garbage").peers == {}
