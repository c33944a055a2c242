"""Multiaddr handling: ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>[/p2p/<PeerID>]``, and the libp2p circuit form
``/ip4/<relay host>/tcp/<port>/p2p/<relay PeerID>/p2p-circuit[/p2p/<PeerID>]`` (a peer reached through a relay:
docs/transport.md, "Reachability and relays").

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
    """A TCP endpoint, optionally with the PeerID expected there. With ``relay`` set it is a circuit address:
    ``host``/``port`` are the relay's, ``relay`` its PeerID, ``peer_id`` the peer reached through it."""

    host: str
    port: int
    protocol: str = "ip4"
    peer_id: PeerID | None = None
    relay: PeerID | None = None

    def __post_init__(self) -> None:
        if self.protocol not in _HOST_PROTOCOLS:
            raise AddressError(f"protocol must be one of {_HOST_PROTOCOLS}, got {self.protocol!r}")
        if not 0 <= self.port <= 65535:
            raise AddressError(f"port must be in 0..65535, got {self.port}")
        if not self.host:
            raise AddressError("host must not be empty")

    @property
    def is_circuit(self) -> bool:
        """Whether this is a circuit address (the peer is reached through ``relay``)."""
        return self.relay is not None

    def with_peer_id(self, peer_id: PeerID) -> PeerAddress:
        return PeerAddress(host=self.host, port=self.port, protocol=self.protocol, peer_id=peer_id, relay=self.relay)

    def relay_address(self) -> PeerAddress:
        """The relay's own (direct) address of a circuit address."""
        return PeerAddress(host=self.host, port=self.port, protocol=self.protocol, peer_id=self.relay)

    def to_maddr(self) -> str:
        text = f"/{self.protocol}/{self.host}/tcp/{self.port}"
        if self.relay is not None:
            text += f"/p2p/{self.relay.to_base58()}/p2p-circuit"
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
    if len(parts) in (4, 5) and names[:4] == [names[0], "tcp", "p2p", "p2p-circuit"]:
        return _parse_circuit(text, parts, names)
    if len(parts) not in (2, 3) or names[0] not in _HOST_PROTOCOLS or names[1] != "tcp":
        raise AddressError(
            f"unsupported multiaddr {text!r}: expected /ip4|ip6|dns4|dns6/<host>/tcp/<port>[/p2p/<PeerID>]"
        )
    if len(parts) == 3 and names[2] != "p2p":
        raise AddressError(f"unsupported multiaddr {text!r}: the third part must be /p2p/<PeerID>")
    peer_id = _peer_id(text, parts[2][1]) if len(parts) == 3 else None
    return PeerAddress(host=str(parts[0][1]), port=int(parts[1][1]), protocol=names[0], peer_id=peer_id)


def _parse_circuit(text: str, parts: list[tuple[object, object]], names: list[str]) -> PeerAddress:
    if names[0] not in _HOST_PROTOCOLS or (len(parts) == 5 and names[4] != "p2p"):
        raise AddressError(
            f"unsupported circuit multiaddr {text!r}: expected "
            "/ip4|ip6|dns4|dns6/<host>/tcp/<port>/p2p/<relay PeerID>/p2p-circuit[/p2p/<PeerID>]"
        )
    relay = _peer_id(text, parts[2][1])
    peer_id = _peer_id(text, parts[4][1]) if len(parts) == 5 else None
    return PeerAddress(
        host=str(parts[0][1]), port=int(str(parts[1][1])), protocol=names[0], peer_id=peer_id, relay=relay
    )


def _peer_id(text: str, value: object) -> PeerID:
    try:
        return PeerID.from_base58(str(value))
    except IdentityError as e:
        raise AddressError(f"multiaddr {text!r} has a bad /p2p/ part: {e}") from None


def circuit_address(relay: PeerAddress, peer_id: PeerID) -> PeerAddress:
    """The circuit address of ``peer_id`` through ``relay`` (a direct address with the relay's PeerID)."""
    if relay.peer_id is None or relay.relay is not None:
        raise AddressError(f"a relay address needs /p2p/<PeerID> and no circuit of its own, got {relay}")
    return PeerAddress(host=relay.host, port=relay.port, protocol=relay.protocol, peer_id=peer_id, relay=relay.peer_id)


def format_maddr(host: str, port: int, peer_id: PeerID | None = None) -> str:
    """The multiaddr of a TCP endpoint; IPv6 hosts get /ip6, names /dns4."""
    if ":" in host:
        protocol = "ip6"
    elif host.replace(".", "").isdigit():
        protocol = "ip4"
    else:
        protocol = "dns4"
    return PeerAddress(host=host, port=port, protocol=protocol, peer_id=peer_id).to_maddr()
