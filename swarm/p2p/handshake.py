"""The Noise XX handshake of one connection, as the dialler (initiator) and as the listener (responder).

The connection lends its records (a ``HandshakeChannel``); the handshake returns the authenticated PeerID and
the two cipher states. A dialler that gets a refusal record in place of message 2 (``swarm/p2p/refusal.py``)
raises OverloadedError for "at its connection limit", TransportError for any other code. A listener whose
first record is a circuit request (``swarm/p2p/circuit.py``) raises `CircuitRequest` for its relay service.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.circuit import CircuitRequest, is_circuit_record, parse_circuit_record
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.noise import CipherState, HandshakeState, make_payload, verify_payload
from swarm.p2p.refusal import AT_CONNECTION_LIMIT, AT_LIMIT_TEXT, parse_refusal
from swarm.errors import OverloadedError, PeerIDMismatchError, TransportError


class HandshakeChannel(Protocol):
    """What the handshake needs from its connection: whole records in and out."""

    def write_record(self, message: bytes) -> None: ...

    async def read_handshake_record(self) -> bytes: ...

    def replied(self) -> None:
        """The responder sent message 2 (from now until message 3 arrives, no refusal fits)."""


async def noise_xx(
    channel: HandshakeChannel,
    *,
    initiator: bool,
    where: str,
    identity: Identity,
    static_key: X25519PrivateKey,
    expected: PeerID | None,
) -> tuple[PeerID, CipherState, CipherState]:
    """Run Noise XX over ``channel`` (the peer at ``where``, "host:port"); return the remote PeerID and the
    (send, receive) cipher states. ``expected``: the PeerID the dialler wants (PeerIDMismatchError otherwise)."""
    hs = HandshakeState(initiator=initiator, static_key=static_key)
    payload = make_payload(identity, static_key)
    if initiator:
        channel.write_record(hs.write_message(b""))
        message = await channel.read_handshake_record()
        refusal = parse_refusal(message)
        if refusal is not None:
            _raise_refused(where, *refusal)
        remote = verify_payload(hs.read_message(message), hs.rs or b"")
        if expected is not None and remote != expected:
            raise PeerIDMismatchError(
                f"dialled {where} expecting peer {expected} but it proved to be "
                f"{remote}; the address is stale or wrong: update the multiaddr's /p2p/ part"
            )
        channel.write_record(hs.write_message(payload))
    else:
        first = await channel.read_handshake_record()
        if is_circuit_record(first):  # not a handshake: a circuit request for this node's relay service
            raise CircuitRequest(parse_circuit_record(first))
        hs.read_message(first)
        channel.write_record(hs.write_message(payload))
        channel.replied()
        remote = verify_payload(hs.read_message(await channel.read_handshake_record()), hs.rs or b"")
    send, recv = hs.split()
    return remote, send, recv


def _raise_refused(where: str, code: str, message: str) -> NoReturn:
    if code == AT_CONNECTION_LIMIT:
        raise OverloadedError(
            f"{where} refused the connection: {AT_LIMIT_TEXT} ({message}); retry later or use another peer"
        )
    raise TransportError(f"{where} refused the connection ({code}): {message}")
