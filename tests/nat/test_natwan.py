"""The NAT bed on emulated WAN links (`swarm.testing.natwan`): a home behind its router reaches a public host at
the profile's round trip, cannot be dialled from outside, and the bed removes exactly what it built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarm.testing.natwan import NatWanBed, unavailable_reason
from swarm.testing.netbed import PROFILES

PROBE = [sys.executable, "-m", "swarm.testing.netbed.probe"]
PORT = 5201


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_home_reaches_a_public_host_at_the_profiles_round_trip() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    before = _namespaces()
    with NatWanBed(public=1, homes=1, profile="wan", seed=3) as bed:
        assert _namespaces() - before == {bed.homes[0].name, *bed.net.namespaces}
        public, home = bed.public_hosts[0], bed.homes[0]
        for host in (public, home):
            server = bed.popen(host, [*PROBE, "serve", "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            assert json.loads(server.stdout.readline()) == {"serving": PORT}
        out = bed.command(home, [*PROBE, "rtt", "--host", public.ip, "--port", str(PORT), "--count", "10"])
        done = subprocess.run(out, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        rtt_ms = json.loads(done.stdout)["rtt_ms"]
        profile_ms = PROFILES["wan"].rtt_ms  # the router's access link and the public host's: one profile path
        assert abs(rtt_ms - profile_ms) <= 0.1 * profile_ms, (rtt_ms, profile_ms)
        # nothing from outside reaches the home: its router's wan address does not lead to the home's server
        inward = bed.command(public, [*PROBE, "rtt", "--host", home.wan_ip or "", "--port", str(PORT), "--count", "1"])
        assert subprocess.run(inward, capture_output=True, text=True, timeout=90).returncode != 0
    assert _namespaces() == before


_HOLD = """
import sys, time
from swarm.testing.natwan import NatWanBed
bed = NatWanBed(public=1, homes=1)
bed.create()
print(" ".join([bed.homes[0].name, *bed.net.namespaces]), flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigterm", "sigkill+cleanup"])
def test_the_bed_goes_on_sigterm_and_the_cleanup_command_removes_a_killed_beds(how: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    owner = subprocess.Popen([sys.executable, "-c", _HOLD], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        names = set(owner.stdout.readline().split())
        assert len(names) == 3 and names <= _namespaces()
        if how == "sigterm":
            owner.terminate()
            owner.wait(timeout=60)
        else:
            owner.kill()
            owner.wait(timeout=60)
            assert names <= _namespaces()  # a SIGKILL leaves them behind ...
            cmd = [sys.executable, "-m", "swarm.testing.natwan", "cleanup"]
            assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        assert not names & _namespaces()  # ... and the cleanup command removes them
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
