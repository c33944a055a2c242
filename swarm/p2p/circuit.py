"""Circuits: the records that open a relayed connection, and the errors a relay answers with.

A circuit is a plain TCP connection to a relay that the relay splices to another TCP connection, opened by the
peer behind NAT back to the relay; the two ends then run their own Noise XX handshake through the splice, so the
relay forwards only ciphertext and cannot pose as either end (the dialler's handshake must prove the target's
PeerID). Before the handshake, one record in the handshake's framing (``u16 length | body``) says what the
socket is for, where a Noise message 1 would be:

- dialler -> relay: ``CIRCUIT_MAGIC | msgpack {"op": "connect", "target": <PeerID bytes>}``
- relay -> dialler: ``CIRCUIT_MAGIC | msgpack {"op": "ok"}`` once spliced, or a refusal record
  (``swarm/p2p/refusal.py``) whose code says why: ``relay_limit``, ``no_reservation``, ``relay_unavailable``.
- target -> relay: ``CIRCUIT_MAGIC | msgpack {"op": "accept", "token": <16 bytes>}`` (the token came in the
  relay's ``relay.incoming`` call over the target's reservation connection); nothing answers it.

A Noise message 1 is 32 random bytes, so it starts with the 16-byte magic with probability 2**-128.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import packb, unpackb
from swarm.p2p.refusal import parse_refusal
from swarm.errors import HandshakeError, IdentityError, OverloadedError, ProtocolError, SwarmError, TransportError

CIRCUIT_MAGIC = b"\x00swarm/circuit/1"
MAX_CIRCUIT_RECORD_BYTES = 512
TOKEN_BYTES = 16

# refusal codes a relay answers a circuit request with
RELAY_LIMIT = "relay_limit"
NO_RESERVATION = "no_reservation"
RELAY_UNAVAILABLE = "relay_unavailable"


class RelayLimitError(OverloadedError):
    """The relay refused a circuit or a reservation: one of its limits is reached (circuits, reservations)."""

    code = "relay_limit"


class CircuitRefusedError(TransportError):
    """The relay refused a circuit: the target holds no reservation there, or the relay offers no service."""

    code = "circuit_refused"


class CircuitRequest(SwarmError):
    """Raised by a listener's handshake when the first record opens a circuit instead of a Noise handshake."""

    code = "circuit_request"

    def __init__(self, request: CircuitRecord) -> None:
        super().__init__(f"a circuit request ({request.op})")
        self.request = request


@dataclass(frozen=True, kw_only=True)
class CircuitRecord:
    """One parsed circuit record: ``op`` is ``connect`` (``target``), ``accept`` (``token``) or ``ok``."""

    op: str
    target: PeerID | None = None
    token: bytes = b""

    def encode(self) -> bytes:
        body: dict[str, object] = {"op": self.op}
        if self.target is not None:
            body["target"] = self.target.to_bytes()
        if self.token:
            body["token"] = self.token
        return CIRCUIT_MAGIC + packb(body)


def is_circuit_record(record: bytes) -> bool:
    return record.startswith(CIRCUIT_MAGIC)


def parse_circuit_record(record: bytes) -> CircuitRecord:
    """The circuit record in ``record`` (which starts with the magic); ProtocolError if it is malformed."""
    if len(record) > MAX_CIRCUIT_RECORD_BYTES:
        raise ProtocolError(f"a circuit record of {len(record)} bytes (max {MAX_CIRCUIT_RECORD_BYTES})")
    obj = unpackb(record[len(CIRCUIT_MAGIC) :], max_size_bytes=MAX_CIRCUIT_RECORD_BYTES)
    if not isinstance(obj, dict) or obj.get("op") not in ("connect", "accept", "ok"):
        raise ProtocolError("a malformed circuit record: expected {op: connect|accept|ok, ...}")
    op = obj["op"]
    if op == "connect":
        target = obj.get("target")
        if not isinstance(target, bytes):
            raise ProtocolError("a circuit connect record without a target PeerID")
        try:
            return CircuitRecord(op=op, target=PeerID(target))
        except IdentityError as e:
            raise ProtocolError(f"a circuit connect record with a bad target: {e}") from None
    if op == "accept":
        token = obj.get("token")
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
            raise ProtocolError(f"a circuit accept record without a {TOKEN_BYTES}-byte token")
        return CircuitRecord(op=op, token=token)
    return CircuitRecord(op=op)


def check_circuit_answer(record: bytes, where: str) -> None:
    """The relay's answer to a connect record: return if the circuit is open, else raise the relay's refusal
    (`RelayLimitError` for ``relay_limit``, `CircuitRefusedError` otherwise)."""
    refusal = parse_refusal(record)
    if refusal is not None:
        code, message = refusal
        text = f"relay {where} refused the circuit ({code}): {message}"
        if code == RELAY_LIMIT:
            raise RelayLimitError(text + "; retry later or use another relay")
        raise CircuitRefusedError(text)
    if not is_circuit_record(record):
        raise HandshakeError(f"relay {where} answered a circuit request with something else; is it a swarm node?")
    try:
        answer = parse_circuit_record(record)
    except ProtocolError as e:
        raise HandshakeError(f"relay {where}: {e}") from None
    if answer.op != "ok":
        raise HandshakeError(f"relay {where} answered a circuit request with {answer.op!r}")
