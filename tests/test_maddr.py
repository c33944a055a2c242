"""Multiaddrs: the supported forms parse, print back, and interoperate with the multiaddr package."""

from __future__ import annotations

import pytest
from multiaddr import Multiaddr

from swarm.p2p.identity import Identity
from swarm.p2p.maddr import PeerAddress, format_maddr, parse_maddr
from swarm.errors import AddressError

PEER = Identity.from_seed(b"\x05" * 32).peer_id


@pytest.mark.parametrize(
    "text, host, protocol",
    [
        ("/ip4/127.0.0.1/tcp/31337", "127.0.0.1", "ip4"),
        ("/ip6/::1/tcp/31337", "::1", "ip6"),
        ("/dns4/example.org/tcp/31337", "example.org", "dns4"),
        ("/dns6/example.org/tcp/31337", "example.org", "dns6"),
    ],
)
def test_supported_forms_round_trip(text: str, host: str, protocol: str) -> None:
    for full, peer in ((text, None), (f"{text}/p2p/{PEER}", PEER)):
        addr = parse_maddr(full)
        assert (addr.host, addr.port, addr.protocol, addr.peer_id) == (host, 31337, protocol, peer)
        assert addr.to_maddr() == full
        assert str(Multiaddr(addr.to_maddr())) == full


@pytest.mark.parametrize(
    "text",
    [
        "ip4/127.0.0.1/tcp/1",
        "/ip4/127.0.0.1/udp/1",
        "/ip4/127.0.0.1",
        "/ip4/300.0.0.1/tcp/1",
        "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "/ip4/127.0.0.1/tcp/1/ws",
        "/ip4/127.0.0.1/tcp/99999",
    ],
)
def test_bad_multiaddrs_are_rejected(text: str) -> None:
    with pytest.raises(AddressError):
        parse_maddr(text)


def test_format_and_peer_address_checks() -> None:
    assert format_maddr("127.0.0.1", 1, PEER) == f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"
    assert format_maddr("::1", 2) == "/ip6/::1/tcp/2"
    assert format_maddr("localhost", 3) == "/dns4/localhost/tcp/3"
    addr = PeerAddress(host="127.0.0.1", port=4)
    assert addr.with_peer_id(PEER).peer_id == PEER and addr.peer_id is None
    with pytest.raises(AddressError, match="port"):
        PeerAddress(host="h", port=70000)
    with pytest.raises(AddressError, match="protocol"):
        PeerAddress(host="h", port=1, protocol="udp")
    with pytest.raises(AddressError, match="host"):
        PeerAddress(host="", port=1)
