"""What both sides of a transport share: the node's identity and keys, its limits, the connection budget and
table, and how a connection that finished its handshake is handed to the transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.admission import Admission
from swarm.p2p.circuit import CircuitRecord
from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.conntable import ConnectionTable
from swarm.p2p.identity import Identity


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """The collaborators the `Dialer` and the `Listener` of one transport both use."""

    identity: Identity
    static_key: X25519PrivateKey
    config: TransportConfig
    admission: Admission
    table: ConnectionTable
    establish: Callable[[Connection], None]  # hands a connection that finished its handshake to the transport
    on_circuit: Callable[[Connection, CircuitRecord], None]  # an accepted socket asks for a circuit (relay.py)
