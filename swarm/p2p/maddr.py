"""Multiaddr handling: ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>[/p2p/<PeerID>]``.

Parsing uses the ``multiaddr`` package, so any address printed here parses there and back.
"""

from __future__ import annotations

from dataclasses import dataclass

from multiaddr import Multiaddr

from swarm.p2p.identity import PeerID
from swarm.errors import AddressError, IdentityError

_HOST_PROTOCOLS = ("ip4", "ip6", "dns4", "dns6")


@dataclass(frozen=True, kw_only=True)
class PeerAddress:
    """A TCP endpoint, optionally with the PeerID expected there."""

    host: str
    port: int
    protocol: str = "ip4"
    peer_id: PeerID | None = None

    def __post_init__(self) -> None:
        if self.protocol not in _HOST_PROTOCOLS:
            raise AddressError(f"protocol must be one of {_HOST_PROTOCOLS}, got {self.protocol!r}")
        if not 0 <= self.port <= 65535:
            raise AddressError(f"port must be in 0..65535, got {self.port}")
        if not self.host:
            raise AddressError("host must not be empty")

    def with_peer_id(self, peer_id: PeerID) -> PeerAddress:
        return PeerAddress(host=self.host, port=self.port, protocol=self.protocol, peer_id=peer_id)

    def to_maddr(self) -> str:
        text = f"/{self.protocol}/{self.host}/tcp/{self.port}"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id.to_base58()}"
        return text

    def __str__(self) -> str:
        return self.to_maddr()


def parse_maddr(text: str) -> PeerAddress:
    """Parse a multiaddr string; raise AddressError naming what is wrong and what is expected."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise AddressError(f"multiaddr {text!r} must start with '/', e.g. /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...")
    try:
        parts = list(Multiaddr(text).items())
    except Exception as e:  # the multiaddr package raises several unrelated types
        raise AddressError(f"cannot parse multiaddr {text!r}: {e}") from None
    names = [proto.name for proto, _ in parts]
    if len(parts) not in (2, 3) or names[0] not in _HOST_PROTOCOLS or names[1] != "tcp":
        raise AddressError(
            f"unsupported multiaddr {text!r}: expected /ip4|ip6|dns4|dns6/<host>/tcp/<port>[/p2p/<PeerID>]"
        )
    if len(parts) == 3 and names[2] != "p2p":
        raise AddressError(f"unsupported multiaddr {text!r}: the third part must be /p2p/<PeerID>")
    peer_id = None
    if len(parts) == 3:
        try:
            peer_id = PeerID.from_base58(str(parts[2][1]))
        except IdentityError as e:
            raise AddressError(f"multiaddr {text!r} has a bad /p2p/ part: {e}") from None
    return PeerAddress(host=str(parts[0][1]), port=int(parts[1][1]), protocol=names[0], peer_id=peer_id)


def format_maddr(host: str, port: int, peer_id: PeerID | None = None) -> str:
    """The multiaddr of a TCP endpoint; IPv6 hosts get /ip6, names /dns4."""
    if ":" in host:
        protocol = "ip6"
    elif host.replace(".", "").isdigit():
        protocol = "ip4"
    else:
        protocol = "dns4"
    return PeerAddress(host=host, port=port, protocol=protocol, peer_id=peer_id).to_maddr()
