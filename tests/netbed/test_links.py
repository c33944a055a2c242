"""The bed delivers what its profiles state: TCP round trips within 10%, bulk TCP within 15% of the line rate,
random loss at the set rate (the issue's validation of the WAN test bed)."""

from __future__ import annotations

import pytest

from swarm.testing.netbed import PROFILES, Bed
from tests.netbed.conftest import probe

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("name", ["wan", "home", "far"])
def test_the_tcp_round_trip_is_the_profiles(bed: Bed, name: str) -> None:
    profile = PROFILES[name]
    bed.set_profile(profile)
    rtt_ms = probe(bed, 0, "rtt", "--count", "10")["rtt_ms"]
    assert abs(rtt_ms - profile.rtt_ms) <= 0.1 * profile.rtt_ms, (name, rtt_ms, profile.rtt_ms)


@pytest.mark.parametrize(("name", "download"), [("wan", False), ("home", False), ("home", True)])
def test_bulk_tcp_runs_at_the_line_rate(bed: Bed, name: str, download: bool) -> None:
    profile = PROFILES[name]
    bed.set_profile(profile)
    if download:  # the server's uplink must not be the limit: it sends at the receiver's downlink rate
        bed.set_link(1, profile.link(up_mbit=1000.0))
    expected = profile.down_mbit if download else profile.path_mbit
    args = ["bulk", "--seconds", "2.5", *(["--download"] if download else [])]
    # the best of at most 3 transfers: the user-space emulator shares 2 cores with everything else, and a stall of
    # it (or an unlucky loss early in a home-profile transfer) only ever slows a transfer; none may beat the rate
    measured: list[float] = []
    for _ in range(3):
        measured.append(probe(bed, 0, *args)["mbit_per_s"])
        if abs(measured[-1] - expected) <= 0.15 * expected:
            break
    assert max(measured) <= 1.15 * expected, (name, download, measured, expected)
    assert max(measured) >= 0.85 * expected, (name, download, measured, expected)


def test_loss_is_applied_at_the_set_rate(bed: Bed) -> None:
    bed.set_profile(PROFILES["lan"])
    bed.set_link(0, PROFILES["lan"].link(loss=0.05))  # each crossing of host 0's link: 5%
    before = bed.stats()[0]
    result = probe(bed, 0, "udp", "--count", "3000", "--interval", "0.0003")
    after = bed.stats()[0]
    # 3000 datagrams at 5%: 150 expected, standard deviation 12; four of them either way
    assert 150 - 48 <= result["sent"] - result["received"] <= 150 + 48, result
    # the emulator counted them (and the frames of the probe's TCP connection it lost too)
    assert after["lost"] - before["lost"] >= result["sent"] - result["received"]
