"""Behind a real NAT (network namespaces, nftables masquerade): who learns it is reachable, and what it announces."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.p2p.maddr import parse_maddr
from swarm.testing.natbed import NatBed
from tests.nat.natnodes import PORT, BedNode, bootstrap_maddr, skip_without_bed, start_nodes, stop_nodes, wait_until


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_nat_node_learns_it_is_unreachable_and_uses_relays(tmp_path: Path) -> None:
    """Two public nodes learn they are public; a node behind NAT learns it is not, announces no direct
    address but circuit addresses through two relays; a node behind NAT with port forwarding and
    ``--announce`` is dialled back there and announces it."""
    skip_without_bed()
    nodes: list[BedNode] = []
    with NatBed(public=2, homes=2, tag=f"r{tmp_path.name[-6:]}") as bed:
        try:
            p1, p2 = bed.public_hosts
            home_a, home_b = bed.homes
            bed.forward_port(home_b, PORT)
            announce = f"/ip4/{home_b.wan_ip}/tcp/{PORT}"
            specs = [(p1, []), (p2, []), (home_a, []), (home_b, ["--announce", announce])]
            nodes.extend(start_nodes(bed, tmp_path, specs, bootstrap_maddr(p1, tmp_path), light=True))
            nat, forwarded = nodes[2], nodes[3]

            def settled() -> bool:
                events = [n.reachability() for n in nodes]
                want = ("public", "public", "relayed", "public")
                ok = all(e is not None and e.status == s for e, s in zip(events, want, strict=True))
                return ok and len(events[2].maddrs) == 2  # type: ignore[union-attr]

            wait_until("public nodes public, the NAT'd node relayed through two relays", settled, nodes, 60)
            for node, host in ((nodes[0], p1), (nodes[1], p2)):
                event = node.reachability()
                assert event is not None and [parse_maddr(m).host for m in event.maddrs] == [host.ip]
            relayed = nat.reachability()
            assert relayed is not None
            addrs = [parse_maddr(m) for m in relayed.maddrs]
            assert all(a.relay is not None and a.host not in (home_a.ip, home_a.wan_ip) for a in addrs)
            assert {a.relay for a in addrs} <= {parse_maddr(n.maddr).peer_id for n in nodes if n is not nat}
            event = forwarded.reachability()
            assert event is not None and [m.split("/p2p/")[0] for m in event.maddrs] == [announce]
        finally:
            stop_nodes(nodes)
