"""Training through NAT: a stage-0 driver behind NAT A and a stage-1 server behind NAT B reach each other through
relays (network namespaces, nftables masquerade), and the swarm trains; when one of their two relays is killed
mid-run they keep the other, announce only it, and steps keep advancing. Their work is receipted and rewarded:
the public bootstrap node stands as orchestrator, and ``swarm-dht attestations --verify``, run from the public
segment while the swarm trains, verifies every attested window and finds both NAT'd peers paid: over the windows
attested before the kill (waiting until it pays both) and over two windows after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swarm.p2p.maddr import parse_maddr
from swarm.testing.natbed import Host, NatBed
from swarm.verification.attestation import Attestation
from swarm.verification.ledger import Ledger
from tests.nat.natnodes import BedNode, bootstrap_maddr, skip_without_bed, start_nodes, stop_nodes, wait_until
from tests.training.swarm_harness import small_run

STEPS = 5  # before the relay is killed, and again after
WINDOW_STEPS = 5  # verification's window_steps in the run (its default)


def attestations(ledger_dir: Path) -> list[Attestation]:
    """What the orchestrator's ledger (``<data dir>/ledger/<run>.jsonl``) holds so far."""
    return [att for path in ledger_dir.glob("*.jsonl") for att in Ledger(path).read()]


def attested_windows(ledger_dir: Path) -> set[int]:
    """The windows the orchestrator's ledger holds so far."""
    return {att.window for att in attestations(ledger_dir)}


def paid_windows(ledger_dir: Path, peer: bytes) -> set[int]:
    """The windows of the orchestrator's ledger in which ``peer`` has a share."""
    return {att.window for att in attestations(ledger_dir) if any(e.peer == peer and e.share > 0 for e in att.shares)}


def audit(bed: NatBed, host: Host, bootstrap: str, run_id: str) -> list[dict[str, Any]]:
    """``swarm-dht attestations --verify --json`` run on ``host``: every attested window, checked against the
    receipts and verdicts in the DHT."""
    cli = [sys.executable, "-m", "swarm.cli.dht", "--initial-peers", bootstrap, "attestations", "--run", run_id]
    done = subprocess.run(bed.command(host, [*cli, "--verify", "--json"]), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_training_through_nat(tmp_path: Path) -> None:
    skip_without_bed()
    config = tmp_path / "run.toml"
    config.write_text(small_run().to_toml())
    nodes: list[BedNode] = []
    with NatBed(public=2, homes=2, tag=f"t{tmp_path.name[-6:]}") as bed:
        try:
            p1, p2 = bed.public_hosts
            home_a, home_b = bed.homes
            common = ["--config", str(config), "--start-after-peers", "4", "--log-level", "INFO"]
            specs = [
                (p1, [*common, "--stage", "0", "--orchestrator-candidate"]),
                (p2, [*common, "--stage", "1"]),
                (home_a, [*common, "--stage", "0"]),  # a driver (role auto on stage 0) behind NAT A
                (home_b, [*common, "--stage", "1", "--role", "server"]),  # a stage-1 server behind NAT B
            ]
            nodes.extend(start_nodes(bed, tmp_path, specs, bootstrap_maddr(p1, tmp_path)))
            driver, server = nodes[2], nodes[3]

            def relayed() -> bool:
                events = [driver.reachability(), server.reachability()]
                return all(e is not None and e.status == "relayed" for e in events)

            wait_until("both NAT'd nodes relayed", relayed, nodes, 60)
            wait_until(f"step {STEPS} on every node", lambda: min(n.newest_step() for n in nodes) >= STEPS, nodes, 150)
            for node in (driver, server):
                event = node.reachability()
                assert event is not None and len(event.maddrs) == 2
                assert all(parse_maddr(m).relay is not None for m in event.maddrs)  # no direct address announced
            ledger = tmp_path / "p1" / "ledger"  # the orchestrator's (the public bootstrap node's)
            # the NAT'd pair paid in the windows attested before the kill (checked again below, from the DHT, by
            # the audit): the killed stage-1 server signed receipts of the NAT'd driver's stage-0 work, and a server
            # killed as its window closes never publishes them. The public driver may train the first steps alone
            # (its start gate opens first and a step takes 0.1 s), so no fixed window is assumed.
            natted_ids = [parse_maddr(n.maddr).peer_id.to_bytes() for n in (driver, server)]  # type: ignore[union-attr]
            wait_until(
                "the NAT'd pair paid in an attested window",
                lambda: all(paid_windows(ledger, peer) for peer in natted_ids),
                nodes,
                60,
            )
            early = attested_windows(ledger)
            killed, alive = nodes[1], [nodes[0], driver, server]
            killed_at = max(n.newest_step() for n in nodes)
            killed.proc.kill()  # a relay (and the public stage-1 server) vanishes mid-run
            killed.proc.wait(timeout=30)
            survivor = parse_maddr(nodes[0].maddr).peer_id

            def moved() -> bool:
                events = [driver.reachability(), server.reachability()]
                return all(e is not None and {parse_maddr(m).relay for m in e.maddrs} == {survivor} for e in events)

            wait_until("the NAT'd nodes announce only the surviving relay", moved, alive, 30)
            after = min(n.newest_step() for n in alive) + STEPS
            wait_until(
                f"step {after} after the relay died", lambda: min(n.newest_step() for n in alive) >= after, alive, 120
            )
            # and two windows wholly after the kill: the NAT'd pair's only stage-1 peer / driver is each other
            first = killed_at // WINDOW_STEPS + 1
            later = {first, first + 1}
            wait_until(f"windows {sorted(later)} attested", lambda: attested_windows(ledger) >= later, alive, 60)
            run_id = next(Ledger(path).read()[0].run_id for path in ledger.glob("*.jsonl"))
            audits = {row["window"]: row for row in audit(bed, p1, nodes[0].maddr, run_id)}
        finally:
            stop_nodes(nodes)
        summaries = {n.host.name: json.loads(n.summary.read_text()) for n in (nodes[0], driver, server)}
        assert summaries[driver.host.name]["samples"] > 0  # the NAT'd driver drove ...
        assert summaries[server.host.name]["served_samples"] > 0  # ... and the NAT'd server served
        assert min(s["step"] for s in summaries.values()) >= 2 * STEPS
        natted = {parse_maddr(n.maddr).peer_id.to_base58() for n in (driver, server)}  # type: ignore[union-attr]
        assert all(row["verified"] and row["ok"] for row in audits.values()), audits  # every window verifies
        # the NAT'd pair's work receipted and paid: before the kill, and after it (a 5-step window is ~2 s, so
        # a driver that waited out a retry there may have no work in it: the two windows together)
        paid_early = {peer: sum(audits[w]["shares"].get(peer, 0.0) for w in early) for peer in natted}
        assert all(share > 0 for share in paid_early.values()), (paid_early, [audits[w] for w in sorted(early)])
        paid_later = {peer: sum(audits[w]["shares"].get(peer, 0.0) for w in later) for peer in natted}
        assert all(share > 0 for share in paid_later.values()), (paid_later, [audits[w] for w in later])
