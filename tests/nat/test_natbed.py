"""The NAT bed builds what it says and removes exactly what it built."""

from __future__ import annotations

import subprocess

from swarm.testing.natbed import NatBed, cleanup_all
from tests.nat.natnodes import skip_without_bed


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bed_masquerades_and_removes_exactly_its_namespaces() -> None:
    skip_without_bed()
    before = _namespaces()
    with NatBed(public=1, homes=1, tag="bedtest") as bed:
        created = _namespaces() - before
        assert created == set(bed.created) and all(n.startswith("swnat-bedtest-") for n in created)
        home, public = bed.homes[0], bed.public_hosts[0]
        rules = subprocess.run(bed.command(home, ["true"]), timeout=30)  # the home host runs programs
        assert rules.returncode == 0
        out = subprocess.run(
            ["ip", "netns", "exec", home.router or "", "nft", "list", "ruleset"], capture_output=True, text=True
        ).stdout
        assert "masquerade" in out and 'iifname "wan" ct state new drop' in out
        reach = subprocess.run(bed.command(home, ["ip", "route", "get", public.ip]), capture_output=True, text=True)
        assert "via 192.168.1.1" in reach.stdout  # the home reaches the public segment through its router
    assert _namespaces() == before


def test_cleanup_removes_what_a_crashed_run_left() -> None:
    skip_without_bed()
    bed = NatBed(public=1, homes=0, tag="crashed")
    bed.create()
    bed.created.clear()  # as if the process had died without cleaning up
    left = {n for n in _namespaces() if n.startswith("swnat-crashed-")}
    assert len(left) == 2
    assert set(cleanup_all(bed.prefix)) == left  # only this bed's (other beds may be running)
    assert not {n for n in _namespaces() if n.startswith("swnat-crashed-")}
    bed.destroy()
